"""The prediction API, in-process (FastAPI app with its lifespan) against the real Kafka and Redis:
what it answers, what it refuses and why, the learning-loop join, parity with the features code,
admin actions, readiness and model changes read from the registry."""

from __future__ import annotations

import json
import random
import time
import uuid

import pytest
import redis as redis_lib
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from pydantic import SecretStr
from river import linear_model, preprocessing

from driftline.features.definitions import load_feature_set
from driftline.features.store import FeatureStore
from driftline.prediction.app import create_app, parse_body
from driftline.prediction.schemas import PredictRequest, field_value_errors
from driftline.learner.labels import proba_to_text
from driftline.shared.swaps import publish_swap
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.keys import Keys
from driftline.shared.kafka import ensure_topics
from driftline.shared.registry import ModelRegistry
from driftline.shared.settings import PredictionSettings
from driftline.shared.topics import Topics
from conftest import make_settings

FS = load_feature_set("default")
TOKEN = "s3cret-admin-7d1e9b4c2a6f"


def toy_model(seed: int, n: int = 200):
    """A small river classifier trained on default-feature vectors of new entities; each seed
    learns a different boundary, so two versions give different probabilities."""
    rng = random.Random(seed)
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    sign = 1 if seed % 2 else -1
    for _ in range(n):
        fields = {"a": rng.uniform(-1, 1), "b": rng.uniform(-1, 1)}
        model.learn_one(FS.vector({}, fields, 0.0), int(fields["a"] + sign * fields["b"] > 0))
    return model


def expected_proba(model, state, fields, ts) -> dict[str, float]:
    return proba_to_text(model.predict_proba_one(FS.vector(state, fields, ts)))


def registry_of(settings, redis_client) -> ModelRegistry:
    return ModelRegistry(redis_client, Keys(settings.namespace), settings.learner.model_name,
                         settings.model_key.get_secret_value().encode())


def register(settings, redis_client, seed: int, champion: bool = True, parent: int | None = None):
    reg = registry_of(settings, redis_client)
    model = toy_model(seed)
    version = reg.register(model, spec="StandardScaler | LogisticRegression", reason="test", parent=parent)
    if champion:
        reg.set_role("champion", version)
    return version, model


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def consume_all(settings, topic: str, keep, expect: int, timeout: float = 30.0) -> list[dict]:
    """The records of a topic that `keep` accepts (tests share the module's topics), until `expect`."""
    c = kafka.consumer(settings, f"reader-{uuid.uuid4().hex}")
    # From the beginning, explicitly: no committed-offset lookup for a group that never committed.
    c.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in kafka.partitions_of(settings, topic)])
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for m in c.consume(100, timeout=0.3):
                if m.error() is None and keep(record := get_codec().decode(m.value())):
                    out.append(record)
    finally:
        c.close()
    return out


def create_topics(s) -> None:
    """The namespace's topics, and wait until each partition has a leader (a loaded broker can
    list a topic some time before it can take a message for it)."""
    ensure_topics(s)
    admin = kafka.admin(s)
    names = Topics(s.namespace).all()

    def led() -> bool:
        meta = admin.list_topics(timeout=10).topics
        return all(n in meta and all(p.leader >= 0 for p in meta[n].partitions.values()) for n in names)

    wait_for(led, timeout=60, what="partition leaders")


@pytest.fixture(scope="module")
def pipeline(infra, tmp_path_factory):
    """One namespace (topics created once) for this module; tests keep apart by model name."""
    s = make_settings(infra, tmp_path_factory.mktemp("prediction-api"))
    create_topics(s)
    return s


@pytest.fixture
def settings(pipeline):
    """This test's model name in the module's namespace: an empty registry of its own."""
    return pipeline.model_copy(update={"learner": pipeline.learner.model_copy(
        update={"model_name": f"m{uuid.uuid4().hex[:8]}"})})


@pytest.fixture
def redis_client(pipeline):
    client = redis_lib.Redis.from_url(pipeline.redis_url)
    yield client
    client.close()


@pytest.fixture
def client_for(settings):
    """Start the app in-process with this test's settings (plus overrides); stopped after the test."""
    opened: list[TestClient] = []

    def start(**overrides) -> TestClient:
        s = settings.model_copy(update=overrides)
        client = TestClient(create_app(s), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return client

    yield start
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def admin_settings(settings):
    return {"admin_token": SecretStr(TOKEN)}


@pytest.fixture(scope="module")
def served(pipeline):
    """One running app for the tests that only read: a champion, an admin token, small limits
    (max_batch 3, max_body_bytes 4000)."""
    s = pipeline.model_copy(update={"admin_token": SecretStr(TOKEN),
                                    "prediction": PredictionSettings(max_batch=3, max_body_bytes=4000),
                                    "learner": pipeline.learner.model_copy(update={"model_name": "served"})})
    r = redis_lib.Redis.from_url(s.redis_url)
    version, model = register(s, r, seed=1)
    with TestClient(create_app(s), raise_server_exceptions=False) as client:
        yield client, version, model, r, s
    r.close()


# -- predictions -------------------------------------------------------------------------------
def test_predict_answers_with_the_champion_proba_and_names_its_version(served):
    client, version, model, redis_client, settings = served
    fields = {"a": 0.4, "b": -0.2}
    r = client.post("/v1/predict", json={"entity_id": "never-seen", "fields": fields, "ts": 100.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == version
    assert body["proba"] == pytest.approx(expected_proba(model, {}, fields, 100.0), abs=1e-12)
    assert body["prediction"] == max(body["proba"], key=body["proba"].get)
    assert body["event_id"]  # generated when none is given
    # Without an event_id nothing joins the learning loop: no snapshot is written.
    assert not redis_client.exists(Keys(settings.namespace).snapshot(body["event_id"]))


def test_batch_answers_every_item_with_one_version_and_is_bounded(served):
    client, version, model, _r, _s = served
    items = [{"entity_id": f"e{i}", "fields": {"a": i / 3, "b": 0.1}, "ts": 5.0} for i in range(3)]
    r = client.post("/v1/predict/batch", json={"items": items})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == version
    for item, answer in zip(items, r.json()["items"]):
        assert answer["model_version"] == version
        assert answer["proba"] == pytest.approx(expected_proba(model, {}, item["fields"], 5.0), abs=1e-12)
    r = client.post("/v1/predict/batch", json={"items": items + items[:1]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "items"]
    assert "at most 3" in r.json()["detail"][0]["msg"]


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, loc",
    [
        ({"fields": {"a": 1.0}}, ["body", "entity_id"]),
        ({"entity_id": "e", "fields": {"a": [1.5]}}, ["body", "fields", "a"]),  # (a string is a category)
        ({"entity_id": "e", "fields": {"a": True}}, ["body", "fields", "a"]),
        ({"entity_id": "e", "fields": [1, 2]}, ["body", "fields"]),
        ({"entity_id": "", "fields": {}}, ["body", "entity_id"]),
        ({"entity_id": "e", "fields": {}, "colour": "red"}, ["body", "colour"]),
        ({"entity_id": "e", "fields": {}, "ts": "yesterday"}, ["body", "ts"]),
        ({"entity_id": "\ud800", "fields": {}}, ["body", "entity_id"]),  # a lone surrogate: not UTF-8
        ({"entity_id": "e", "fields": {"\udc00": 1.0}}, ["body", "fields", None, "[key]"]),  # None: any name
        ({"entity_id": "e", "fields": {"a": "\udc00"}}, ["body", "fields", "a"]),
    ],
)
def test_input_that_does_not_fit_the_schema_is_422_naming_the_field(served, body, loc):
    # json.dumps escapes non-ASCII (a lone surrogate travels as the JSON escape "\ud800")
    r = served[0].post("/v1/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    locs = [[part if want is not None else None for part, want in zip(e["loc"], loc)] for e in r.json()["detail"]
            if len(e["loc"]) == len(loc)]
    assert loc in locs, r.json()


@pytest.mark.parametrize("value, kind", [(True, "number_or_string"), ([1.5], "number_or_string"),
                                         ({"x": 1}, "number_or_string"), (None, "number_or_string")])
def test_a_field_value_that_is_neither_a_number_nor_text_is_one_error_at_the_field_in_a_batch_too(served, value, kind):
    r = served[0].post("/v1/predict/batch", json={"items": [{"entity_id": "e", "fields": {"a": 1.0}},
                                                            {"entity_id": "e", "fields": {"a": value}}]})
    assert r.status_code == 422, r.text
    assert [(e["loc"], e["type"]) for e in r.json()["detail"]] == [(["body", "items", 1, "fields", "a"], kind)]


def test_a_field_names_own_error_stays_beside_the_one_error_of_its_value():
    errors = [{"type": "string_too_long", "loc": ("fields", "a", "[key]")},
              {"type": "float_type", "loc": ("fields", "a", "float"), "input": True},
              {"type": "string_type", "loc": ("fields", "a", "str"), "input": True}]
    assert [(e["loc"], e["type"]) for e in field_value_errors(errors)] == [
        (("fields", "a", "[key]"), "string_too_long"), (("fields", "a"), "number_or_string")]


def test_json_nested_deeper_than_the_parsers_take_is_a_422_not_a_crash():
    for depth in (300, 5000):  # past pydantic's parser (its fallback is Python's json), past Python's
        body = ('{"entity_id": "e", "fields": {}, "x": ' + "[" * depth + '"\\ud800"' + "]" * depth + "}").encode()
        with pytest.raises(RequestValidationError) as refused:
            parse_body(PredictRequest, body)
        assert refused.value.errors()[0]["loc"][:2] in (("body", "x"), ("body",))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400])
def test_non_finite_numbers_are_422_even_though_python_json_accepts_them(served, literal):
    raw = '{"entity_id": "e", "fields": {"a": %s}}' % literal
    r = served[0].post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "fields", "a"]
    assert r.json()["detail"][0]["type"] == "finite_number"


@pytest.mark.parametrize("route, body, loc", [
    ("/v1/predict", {"entity_id": "e", "fields": {"a": 1e200}}, ["body", "fields"]),
    ("/v1/predict/batch", {"items": [{"entity_id": "e", "fields": {"a": 1.0}},
                                     {"entity_id": "e", "fields": {"a": -2e30}}]}, ["body", "items", 1, "fields"]),
])
def test_numbers_beyond_what_a_model_can_square_are_422_as_at_ingestion(served, route, body, loc):
    # Finite, but a tree's Gaussian estimate of 1e200 raises OverflowError: refused before scoring.
    r = served[0].post(route, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["type"] == "number_out_of_range" and r.json()["detail"][0]["loc"] == loc


def test_body_over_the_limit_is_413_before_it_is_parsed(served):
    client = served[0]
    not_json = b"x" * 4001  # would be a 422 if anything parsed it
    r = client.post("/v1/predict", content=not_json, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "4000 bytes" in r.json()["detail"]
    assert client.post("/v1/predict", content=b"x" * 4000,
                       headers={"content-type": "application/json"}).status_code == 422  # at the limit: parsed

    def chunked():  # no Content-Length: the limit is enforced on the streamed size
        for _ in range(3):
            yield b"y" * 1500

    r = client.post("/v1/predict", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    small = client.post("/v1/predict", json={"entity_id": "e", "fields": {"a": 1.0}})
    assert small.status_code == 200, small.text


def test_admin_routes_are_closed_without_a_configured_token(served):
    closed = served[4].model_copy(update={"admin_token": None})
    with TestClient(create_app(closed), raise_server_exceptions=False) as client:
        r = client.post("/v1/models/1/promote", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403
    assert "no DRIFTLINE_ADMIN_TOKEN is configured" in r.json()["detail"]


def test_admin_routes_need_the_right_bearer_token(served):
    client = served[0]
    assert client.post("/v1/models/rollback").status_code == 401
    assert client.post("/v1/models/rollback", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.post("/v1/models/rollback", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/models/1/promote", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401


def test_rollback_and_promote_change_the_champion_and_publish_model_swaps(settings, redis_client, client_for,
                                                                        admin_settings):
    v1, _ = register(settings, redis_client, seed=1)
    v2, model2 = register(settings, redis_client, seed=2, parent=v1)
    client = client_for(**admin_settings)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/v1/models").json()["serving"] == v2

    r = client.post("/v1/models/rollback", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == {"model": settings.learner.model_name, "from_version": v2, "to_version": v1, "reason": "rollback",
                        "published": True}
    models = client.get("/v1/models").json()
    assert models["champion"] == v1 and models["serving"] == v1
    assert [v["version"] for v in models["versions"]] == [v1, v2]
    assert models["versions"][1]["parent"] == v1  # lineage
    newest = client.get("/v1/models", params={"limit": 1}).json()
    assert [v["version"] for v in newest["versions"]] == [v2] and newest["versions_total"] == 2
    assert client.get("/v1/models", params={"limit": 0}).status_code == 422

    assert client.post("/v1/models/rollback", headers=auth).status_code == 409  # v1 has no parent
    assert client.post("/v1/models/99/promote", headers=auth).status_code == 404
    r = client.post(f"/v1/models/{v2}/promote", headers=auth)
    assert r.status_code == 200 and r.json()["reason"] == "manual"
    fields = {"a": 0.3, "b": 0.9}
    answer = client.post("/v1/predict", json={"entity_id": "x", "fields": fields, "ts": 1.0}).json()
    assert answer["model_version"] == v2
    assert answer["proba"] == pytest.approx(expected_proba(model2, {}, fields, 1.0), abs=1e-12)

    swaps = consume_all(settings, Topics(settings.namespace).model_swaps,
                        lambda m: m["model"] == settings.learner.model_name, expect=2)
    assert [(s["from_version"], s["to_version"], s["reason"]) for s in swaps] == [
        (v2, v1, "rollback"), (v1, v2, "manual")]


# -- readiness and model changes ---------------------------------------------------------------
def test_ready_is_503_with_the_reason_until_the_first_model_appears(settings, redis_client, client_for):
    client = client_for()
    r = client.get("/ready")
    assert r.status_code == 503
    assert any("no model loaded" in reason for reason in r.json()["reasons"])
    assert client.post("/v1/predict", json={"entity_id": "e", "fields": {"a": 1.0}}).status_code == 503
    assert client.get("/health").status_code == 200  # alive all along

    version, _ = register(settings, redis_client, seed=1)
    publish_swap(kafka.producer(settings), Topics(settings.namespace), model=settings.learner.model_name, from_version=None,
                 to_version=version, reason="initial")
    wait_for(lambda: client.get("/ready").status_code == 200, what="/ready 200")
    assert client.get("/ready").json() == {"ready": True, "model_version": version, "reasons": []}
    assert client.post("/v1/predict", json={"entity_id": "e", "fields": {"a": 1.0}}).json()["model_version"] == version


def test_a_tampered_artifact_is_refused_and_the_previous_model_keeps_serving(settings, redis_client, client_for):
    v1, model1 = register(settings, redis_client, seed=1)
    client = client_for()
    v2, _ = register(settings, redis_client, seed=2, champion=False)
    key = Keys(settings.namespace).registry_artifact(settings.learner.model_name, v2)
    blob = bytearray(redis_client.get(key))
    blob[-5] ^= 0xFF  # one flipped byte in the pickle: the signature no longer matches
    redis_client.set(key, bytes(blob))
    registry_of(settings, redis_client).set_role("champion", v2)
    publish_swap(kafka.producer(settings), Topics(settings.namespace), model=settings.learner.model_name, from_version=v1,
                 to_version=v2, reason="promotion")
    models = wait_for(lambda: (m := client.get("/v1/models").json())["refused"] and m, what="the refusal")
    assert "signature does not match" in models["refused"][str(v2)]
    assert models["serving"] == v1
    fields = {"a": 0.1, "b": 0.2}
    answer = client.post("/v1/predict", json={"entity_id": "e", "fields": fields, "ts": 0.0}).json()
    assert answer["model_version"] == v1
    assert answer["proba"] == pytest.approx(expected_proba(model1, {}, fields, 0.0), abs=1e-12)


def test_a_model_update_reloads_the_champion_at_its_new_revision(settings, redis_client, client_for):
    v1, _ = register(settings, redis_client, seed=1)
    client = client_for()
    wait_for(lambda: client.app.state.predictor.follower.assigned, what="the follower")
    better = toy_model(seed=4, n=400)
    revision = registry_of(settings, redis_client).update(v1, better, examples_seen=400)
    producer = kafka.producer(settings)
    kafka.produce(producer, Topics(settings.namespace).model_updates, get_codec().encode(
        "ModelUpdate", {"model": settings.learner.model_name, "version": v1, "examples_seen": 400, "revision": revision,
                        "ts": time.time()}), key=settings.learner.model_name)
    producer.flush(10)
    wait_for(lambda: client.get("/v1/models").json()["serving_revision"] == revision, what="the reload")
    fields = {"a": -0.5, "b": 0.7}
    answer = client.post("/v1/predict", json={"entity_id": "e", "fields": fields, "ts": 0.0}).json()
    assert answer["proba"] == pytest.approx(expected_proba(better, {}, fields, 0.0), abs=1e-12)


# -- the learning loop and parity --------------------------------------------------------------
def test_serving_vector_equals_the_features_code_path_and_event_id_joins_the_learning_loop(
        settings, redis_client, client_for):
    """The entity's state is written the way the features service writes it (FeatureStore +
    FeatureSet.apply_event / the label script); the service must compute the same vector, keep it
    with its prediction for the label, log the prediction, and leave the entity state alone."""
    version, model = register(settings, redis_client, seed=1)
    event_id, entity = f"ev-{uuid.uuid4().hex[:6]}", f"meter-{uuid.uuid4().hex[:6]}"
    keys = Keys(settings.namespace)
    store = FeatureStore(redis_client, keys, FS, settings.features.snapshot_ttl_s)
    state: dict = {}
    for i, price in enumerate([0.2, 0.5, 0.35, 0.8]):
        fields = {"a": price, "b": 1 - price}
        FS.apply_event(state, fields, ts=100.0 + i)
    store.write_states({entity: state})
    pipe = redis_client.pipeline()
    store.queue_label(pipe, entity, "1", 101.0)
    pipe.execute()
    FS.apply_label(state, "1", 101.0)
    before = redis_client.hgetall(keys.entity(entity))

    client = client_for()
    fields, ts = {"a": 0.9, "b": 0.05}, 110.0
    r = client.post("/v1/predict", json={"entity_id": entity, "fields": fields, "event_id": event_id, "ts": ts})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["event_id"] == event_id

    served_vector = FS.vector(state, fields, ts)  # what the features service computes for this event
    assert served_vector["_last_label"] == 1.0 and served_vector["_count"] > 0  # the state really counts
    snap = redis_client.hgetall(keys.snapshot(event_id))
    fv = get_codec().decode(snap[b"fv"], expect="FeatureVector")
    assert fv["features"] == served_vector
    assert fv["features"] == store.vector(entity, fields, ts)
    assert (fv["entity_id"], fv["ts"], fv["feature_set"]) == (entity, ts, FS.name)
    p = get_codec().decode(snap[b"p.champion"], expect="Prediction")
    assert (p["model_version"], p["y_pred"], p["role"], p["source"]) == (version, answer["prediction"],
                                                                         "champion", "prediction")
    assert p["proba"] == pytest.approx(expected_proba(model, state, fields, ts), abs=1e-12)
    assert 0 < redis_client.ttl(keys.snapshot(event_id)) <= settings.features.snapshot_ttl_s
    assert redis_client.hgetall(keys.entity(entity)) == before  # events are the only state writer

    logged = consume_all(settings, Topics(settings.namespace).predictions,
                         lambda m: m["event_id"] == event_id, expect=1)
    assert [(m["event_id"], m["entity_id"], m["model_version"], m["source"]) for m in logged] == [
        (event_id, entity, version, "prediction")]
