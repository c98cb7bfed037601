"""Secure by default: the model key, the admin guard, body limits, bounded state, Kafka
and Redis authentication, settings hygiene and the model-spec parser. Pure rules are unit tests;
the rest runs against the real Kafka and Redis of the session (and, for SASL, a broker of its own)."""

from __future__ import annotations

import gc
import json
import os
import stat
import subprocess
import sys
import time
import tracemalloc
import uuid

import httpx
import pytest
import redis as redis_lib
from confluent_kafka import KafkaException
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from driftline.features.definitions import load_feature_set
from driftline.features.store import FeatureStore, FieldNames, decode_state
from driftline.infra import stack
from driftline.ingestion.api import TooManyItems, iter_items
from driftline.ingestion.validate import check_event_json
from driftline.learner.spec import ModelSpecError, parse_model
from driftline.shared import kafka
from driftline.shared.admin import check_admin
from driftline.shared.codec import get_codec
from driftline.shared.keys import Keys
from driftline.shared.settings import (
    LOCAL_SECRETS,
    IngestionSettings,
    InsecureSettings,
    Settings,
    check_model_key,
    ensure_local_secrets,
    settings_env,
    unknown_env_names,
)
from driftline.shared.topics import Topics
from conftest import make_settings
from test_features_service import event, publish, read_topic, running

codec = get_codec()
GOOD_KEY = "k" * 40


def cli(*args: str, env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`driftline ARGS` in a clean environment (no DRIFTLINE_* but `env`)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLINE_")}
    return subprocess.run([sys.executable, "-m", "driftline.cli", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=timeout)


def offline_env(tmp_path) -> dict[str, str]:
    """Settings pointing at ports where nothing listens, in a private home."""
    return {"DRIFTLINE_HOME": str(tmp_path), "DRIFTLINE_KAFKA_BOOTSTRAP": f"127.0.0.1:{stack.free_port()}",
            "DRIFTLINE_REDIS_URL": f"redis://127.0.0.1:{stack.free_port()}/0",
            "DRIFTLINE_PORTS__DRIFT": str(stack.free_port()), "DRIFTLINE_PORTS__LEARNER": str(stack.free_port())}


# -- the model key -----------------------------------------------------------------------------
@pytest.mark.parametrize("key, problem", [
    ("", "is not set"),
    ("short-key", "shorter than 32"),
    ("driftline-dev-key-change-me", "published development key"),
])
def test_a_weak_model_key_is_refused_naming_the_variable(key, problem):
    with pytest.raises(InsecureSettings, match=f"^DRIFTLINE_MODEL_KEY .*{problem}"):
        check_model_key(Settings(model_key=SecretStr(key)))
    check_model_key(Settings(model_key=SecretStr(GOOD_KEY)))


@pytest.mark.parametrize("key", ["", "short-key", "driftline-dev-key-change-me", None])
def test_a_service_refuses_to_start_with_a_weak_or_missing_model_key(tmp_path, key):
    env = offline_env(tmp_path)
    if key is not None:
        env["DRIFTLINE_MODEL_KEY"] = key
    started = time.monotonic()
    result = cli("serve", "drift", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing to start" in result.stderr and "DRIFTLINE_MODEL_KEY" in result.stderr
    assert time.monotonic() - started < 30  # it stops at once, it does not wait for Kafka


def test_zero_config_generates_a_key_and_token_once_into_the_home(tmp_path):
    first = ensure_local_secrets(Settings(home=tmp_path))
    path = tmp_path / LOCAL_SECRETS
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    check_model_key(first)  # a real key: services start with it
    assert first.admin_token and len(first.admin_token.get_secret_value()) >= 32
    again = ensure_local_secrets(Settings(home=tmp_path))
    assert again.model_key == first.model_key and again.admin_token == first.admin_token
    # every later command with this home uses them, unless the operator sets their own
    assert Settings(home=tmp_path).model_key == first.model_key
    assert Settings(home=tmp_path, model_key=SecretStr(GOOD_KEY)).model_key.get_secret_value() == GOOD_KEY
    assert Settings(home=tmp_path, admin_token=None).admin_token is None
    # and the children of `demo` / `serve all` get them through their environment
    assert settings_env(first)["DRIFTLINE_MODEL_KEY"] == first.model_key.get_secret_value()


def test_compose_requires_the_key_and_token_from_the_environment():
    text = (stack.REPO / "docker-compose.yml").read_text()
    for name in ("DRIFTLINE_MODEL_KEY", "DRIFTLINE_ADMIN_TOKEN", "DRIFTLINE_REDIS_PASSWORD"):
        assert f"${{{name}:?" in text, name
    assert '"--protected-mode", "no"' not in text and "--requirepass" in text


# -- settings hygiene ----------------------------------------------------------------------------
def test_unknown_driftline_names_are_found():
    env = {"DRIFTLINE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "DRIFTLINE_LEARNER__MODLE": "x",
           "DRIFTLINE_LEARNER__MODEL": "x", "DRIFTLINE_DRIFT__DETECTOR_PARAMS__DELTA": "0.1",
           "DRIFTLINE_KAFKA_SECURITY": "{}", "DRIFTLINE_CONFIG": "x.toml", "OTHER": "1"}
    assert unknown_env_names(env) == ["DRIFTLINE_KAFKA__SECURITY_PROTOCOL", "DRIFTLINE_LEARNER__MODLE"]


def test_an_unknown_driftline_name_stops_a_command_at_start(tmp_path):
    result = cli("infra", "status", env={**offline_env(tmp_path), "DRIFTLINE_KAFKA__SASL_PASSWORD": "x"})
    assert result.returncode == 2
    assert "DRIFTLINE_KAFKA__SASL_PASSWORD" in result.stderr


def test_kafka_security_takes_only_security_properties():
    ok = Settings(kafka_security={"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                                  "ssl.ca.location": "/etc/ca.pem"})
    assert kafka.connection(ok)["security.protocol"] == "SASL_SSL"
    with pytest.raises(ValidationError, match="not a security property: acks") as refused:
        Settings(kafka_security={"acks": "0", "sasl.password": "s3cret-in-error"})
    assert "s3cret-in-error" not in str(refused.value)  # errors never echo a value back


def test_infra_status_never_prints_a_secret(tmp_path):
    secrets = {"redis": "r3dis-pa55word", "sasl": "sa5l-pa55word", "key": GOOD_KEY, "token": "t0ken-" + "x" * 30}
    env = {**offline_env(tmp_path),
           "DRIFTLINE_REDIS_URL": f"redis://:{secrets['redis']}@127.0.0.1:{stack.free_port()}/0",
           "DRIFTLINE_KAFKA_SECURITY": json.dumps({"security.protocol": "SASL_PLAINTEXT", "sasl.username": "app",
                                                   "sasl.password": secrets["sasl"]}),
           "DRIFTLINE_MODEL_KEY": secrets["key"], "DRIFTLINE_ADMIN_TOKEN": secrets["token"]}
    for args in (("infra", "status"), ("infra", "status", "--json")):
        result = cli(*args, env=env)
        assert result.returncode == 0, result.stderr
        for secret in secrets.values():
            assert secret not in result.stdout + result.stderr, (args, secret)
    view = json.loads(cli("infra", "status", "--json", env=env).stdout)["settings"]
    assert view["redis_url"].startswith("redis://:***@") and view["kafka_security"]["sasl.password"] == "***"
    empty = json.loads(cli("infra", "status", "--json", env={**env, "DRIFTLINE_ADMIN_TOKEN": ""}).stdout)
    assert empty["settings"]["admin_token"] == "(not set: admin routes closed)"


# -- one admin guard, one body limit -------------------------------------------------------------
@pytest.mark.parametrize("token, header, status", [
    (None, "Bearer anything", 403), ("", "Bearer ", 403), ("", None, 403),
    ("s3cret", None, 401), ("s3cret", "Bearer wrong", 401), ("s3cret", "Basic s3cret", 401),
    ("s3cret", "Bearer ", 401), ("s3cret", "Bearer s3cret", 200),
])
def test_the_admin_guard(token, header, status):
    settings = Settings(admin_token=SecretStr(token) if token is not None else None)
    try:
        check_admin(settings, header)
    except Exception as exc:  # HTTPException
        assert exc.status_code == status and status != 200
        if status == 401:
            assert exc.headers == {"WWW-Authenticate": "Bearer"}
    else:
        assert status == 200


@pytest.fixture
def apps_of():
    """`apps_of(settings)`: the FastAPI apps of the services with admin routes (workers built, not
    started) and the admin route of each; their Kafka clients are released after the test."""
    built = []

    def build(settings):
        apps = service_apps(settings)
        built.append(apps)
        return apps

    yield build
    built.clear()
    gc.collect()  # the producers go with their apps (else they keep calling a broker that is gone)


def service_apps(settings):
    """The FastAPI apps of the services with admin routes (workers built, not started), and the
    admin route of each."""
    from driftline.drift.service import DriftWorker, build_app
    from driftline.learner.service import create_app as learner_app
    from driftline.prediction.app import create_app as prediction_app

    return {
        "learner": (learner_app(settings), "/v1/models/rollback"),
        "drift": (build_app(settings, DriftWorker(settings)), "/v1/retrain"),
        "prediction": (prediction_app(settings), "/v1/models/rollback"),
    }


def test_every_service_answers_admin_requests_the_same_way(settings, apps_of):
    closed = settings.model_copy(update={"admin_token": SecretStr("")})
    for name, (app, route) in apps_of(closed).items():
        client = TestClient(app)  # no lifespan: the workers are not started
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
            assert client.post(route, headers=headers).status_code == 403, (name, headers)
    opened = settings.model_copy(update={"admin_token": SecretStr("s3cret-" + "t" * 30)})
    for name, (app, route) in apps_of(opened).items():
        client = TestClient(app)
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer wrong"}):
            r = client.post(route, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (name, headers, r.text)


def test_every_service_refuses_a_large_body_before_routing_and_auth(settings, apps_of):
    big = b"[" + b"1," * 1_000_000 + b"1]"  # 2 MB of valid JSON, no token
    for name, (app, route) in apps_of(settings).items():
        client = TestClient(app)
        r = client.post(route, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, (name, r.status_code, r.text)

        def chunked():  # no Content-Length: refused while it streams in
            for _ in range(200):
                yield b" " * 10_000

        r = client.post(route, content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413, (name, "chunked", r.status_code)
        assert client.post("/v1/nowhere", content=big).status_code == 413  # before routing too


def test_ingestion_refuses_too_many_items_while_parsing_not_after():
    body = b"[" + b",".join([b"{}"] * 1_000_000) + b"]"  # 3 MB: under the body limit
    tracemalloc.start()
    try:
        with pytest.raises(TooManyItems):
            for _ in iter_items(body, 10_000):
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # json.loads would build a million dicts first (~100 MB); item by item it is the text alone
    assert peak < 20_000_000, peak
    assert list(iter_items(b' [{"a": 1}, {}] ', 2)) == [{"a": 1}, {}]


# -- bounded state --------------------------------------------------------------------------------
def dead_letters(settings, count):
    return read_topic(settings, "events.dlq", count, record="DeadLetter")


def test_a_model_takes_at_most_max_feature_names_distinct_fields(settings, redis_client):
    settings.features.max_feature_names = 4
    settings.features.max_reorder_wait_ms = 50
    publish(settings, events=[event("m1", "a", 1.0, f1=1.0, f2=2.0), event("m2", "b", 2.0, f3=1.0, f4=1.0)])
    with running(settings) as worker:
        assert len(read_topic(settings, "features", 2)) == 2
        publish(settings, events=[event("m3", "c", 3.0, f1=1.0, new=1.0), event("m4", "a", 4.0, f1=3.0, f2=1.0)])
        letter, = dead_letters(settings, 1)
        vectors = read_topic(settings, "features", 3)
    assert letter["reason"] == "too_many_feature_names" and "max_feature_names" in letter["detail"]
    assert codec.decode(letter["payload"], expect="Event")["event_id"] == "m3"
    assert {v["event_id"] for v in vectors} == {"m1", "m2", "m4"}
    assert worker.counts["dead_letters"] == 1
    names = {n.decode() for n in redis_client.smembers(Keys(settings.namespace).field_names("default"))}
    assert names == {"f1", "f2", "f3", "f4"}


def test_an_entity_tracks_at_most_max_entity_fields_distinct_fields(settings, redis_client):
    settings.features.max_entity_fields = 3
    settings.features.max_reorder_wait_ms = 50
    fields = [{f"x{i}": 1.0} for i in range(5)]
    publish(settings, events=[event(f"e{i}", "greedy", float(i), **f) for i, f in enumerate(fields)]
            + [event("other", "modest", 9.0, x4=1.0)])
    with running(settings):
        letters = dead_letters(settings, 2)
        vectors = read_topic(settings, "features", 4)
    assert {(codec.decode(d["payload"], expect="Event")["event_id"], d["reason"]) for d in letters} == {
        ("e3", "too_many_entity_fields"), ("e4", "too_many_entity_fields")}
    assert {v["event_id"] for v in vectors} == {"e0", "e1", "e2", "other"}
    state = redis_client.hgetall(Keys(settings.namespace).entity("greedy"))
    assert load_feature_set("default").tracked(decode_state(state)) == {"x0", "x1", "x2"}


def test_field_names_are_admitted_atomically_up_to_the_bound(settings, redis_client):
    a = FieldNames(redis_client, Keys(settings.namespace), "m", limit=3)
    b = FieldNames(redis_client, Keys(settings.namespace), "m", limit=3)  # another replica
    assert a.admit({"p", "q"}) == set()
    assert b.admit({"q", "r", "s"}) in ({"r"}, {"s"})
    assert a.admit({"p", "q"}) == set()


def test_the_allow_list_refuses_other_field_names():
    limits, now = IngestionSettings(allowed_fields=["price", "demand"]), 1.7e9
    ok = {"event_id": "e", "entity_id": "m", "ts": now, "fields": {"price": 1.0}}
    assert check_event_json(ok, limits, now)["fields"] == {"price": 1.0}
    other = {**ok, "fields": {"price": 1.0, "evil": 2.0}}
    assert check_event_json(other, limits, now).reason == "unknown_field"
    assert check_event_json(other, IngestionSettings(), now)["fields"] == {"price": 1.0, "evil": 2.0}


def test_predict_keeps_ingestions_field_limits_and_never_replaces_a_snapshot(settings, redis_client):
    from test_prediction_api import register

    from driftline.prediction.app import create_app

    s = settings.model_copy(update={"ingestion": settings.ingestion.model_copy(
        update={"allowed_fields": ["a", "b"], "max_fields": 2})})
    register(s, redis_client, seed=1)
    store = FeatureStore(redis_client, Keys(s.namespace), load_feature_set("default"), 3600)
    real = {"event_id": "real-1", "entity_id": "m", "ts": 5.0, "features": {"a": 42.0},
            "feature_set": store.feature_set.name, "published_ms": None}
    store.save_snapshots([real])
    with TestClient(create_app(s)) as client:
        r = client.post("/v1/predict", json={"entity_id": "m", "fields": {"a": 1.0, "c": 2.0}})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "unknown_field", r.text
        r = client.post("/v1/predict", json={"entity_id": "m", "fields": {"a": 1.0, "b": 1.0, "c": 1.0}})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "too_many_fields", r.text
        r = client.post("/v1/predict/batch", json={"items": [{"entity_id": "m", "fields": {"a": 1.0}},
                                                            {"entity_id": "m", "fields": {"zz": 1.0}}]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "items", 1, "fields"], r.text
        # an unauthenticated request with the id of a real event: answered, but the snapshot stays
        r = client.post("/v1/predict", json={"entity_id": "m", "fields": {"a": -7.0}, "event_id": "real-1"})
        assert r.status_code == 200, r.text
        r = client.post("/v1/predict", json={"entity_id": "m", "fields": {"a": -7.0}, "event_id": "fresh-1"})
        assert r.status_code == 200, r.text
    kept = store.read_snapshots(["real-1", "fresh-1"])
    assert kept["real-1"]["features"] == {"a": 42.0}
    assert redis_client.hget(Keys(s.namespace).snapshot("real-1"), "p.champion") is None
    assert kept["fresh-1"]["features"]["a"] == -7.0
    assert 0 < redis_client.ttl(Keys(s.namespace).snapshot("fresh-1")) <= s.features.snapshot_ttl_s


# -- the model-spec parser --------------------------------------------------------------------------
@pytest.mark.parametrize("spec, problem", [
    ("bandit.datasets.base.datasets.Phishing()", "data/IO module"),
    ("bandit.datasets.NewsArticles()", "data/IO module"),
    ("linear_model.base.optim.SGD()", "not an allowed river module"),  # river.optim reached through another
    ("stats.Mean()", "not a river estimator"),
    ("preprocessing.StandardScaler() | drift.ADWIN()", "not a river estimator"),
    ("ensemble.BaggingClassifier(linear_model.LogisticRegression(), n_models=100000000.0)", "ensemble of 1 to 100"),
    ("ensemble.BaggingClassifier(linear_model.LogisticRegression(), n_models=10**8)", "non-literal"),
    ("ensemble.VotingClassifier([" + ", ".join(["tree.HoeffdingTreeClassifier()"] * 101) + "])", "ensemble of 1"),
    ("|".join(["dummy.NoChangeClassifier()"] * 140), "nested more than"),
    ("|".join(["preprocessing.StandardScaler()"] * 500), "characters, more than"),
    ("linear_model.LogisticRegression(l2=" + "[" * 60 + "]" * 60 + ")", "nested"),
])
def test_the_spec_parser_refuses_what_is_outside_or_too_big(spec, problem):
    with pytest.raises(ModelSpecError) as refused:
        parse_model(spec, max_models=100)
    assert problem in str(refused.value)


def test_the_spec_parser_still_builds_river_models_and_objects_as_arguments():
    model = parse_model("preprocessing.StandardScaler() | linear_model.LogisticRegression("
                        "optimizer=optim.SGD(0.05), loss=optim.losses.Log())")
    assert type(model).__name__ == "Pipeline"
    assert parse_model("forest.ARFClassifier(seed=1, n_models=5, drift_detector=drift.ADWIN())").n_models == 5
    assert parse_model("ensemble.BaggingClassifier(tree.HoeffdingTreeClassifier(), n_models=20)",
                       max_models=20).n_models == 20
    with pytest.raises(ModelSpecError, match="learner.max_ensemble"):
        parse_model("ensemble.BaggingClassifier(tree.HoeffdingTreeClassifier(), n_models=21)", max_models=20)


def test_every_dotted_name_to_a_class_outside_the_allowed_modules_is_refused():
    """Walk every attribute chain from the allowed modules (two levels of sub-modules) and try
    each class found: whatever parses must be a river estimator defined in an allowed module."""
    import importlib
    import inspect

    from river import base

    from driftline.learner.spec import ALLOWED_MODULES, DENIED_SUBMODULES

    accepted, refused = 0, 0
    for top in sorted(ALLOWED_MODULES):
        frontier = [(top, importlib.import_module(f"river.{top}"))]
        for _level in range(3):
            nxt = []
            for path, module in frontier:
                for name in dir(module):
                    if name.startswith("_"):
                        continue
                    obj = getattr(module, name)
                    if inspect.ismodule(obj):
                        nxt.append((f"{path}.{name}", obj))
                    elif inspect.isclass(obj):
                        try:
                            from driftline.learner.spec import _Builder

                            cls = _Builder(f"{path}.{name}()", 100).river_class(
                                __import__("ast").parse(f"{path}.{name}", mode="eval").body)
                        except ModelSpecError:
                            refused += 1
                            continue
                        accepted += 1
                        parts = cls.__module__.split(".")
                        assert parts[1] in ALLOWED_MODULES and not DENIED_SUBMODULES & set(parts), (path, name)
                        if not issubclass(cls, base.Base):  # found, but never built
                            with pytest.raises(ModelSpecError, match="not a river"):
                                parse_model(f"{path}.{name}()", max_models=100)
            frontier = nxt
    assert accepted > 100 and refused > 0


# -- Redis with a password ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    home = tmp_path_factory.mktemp("redis-auth")
    password = "r3dis-" + uuid.uuid4().hex
    s = Settings(home=home, redis_url=f"redis://:{password}@127.0.0.1:{stack.free_port()}/0")
    component = stack.Redis(s)
    component.start()
    try:
        stack.wait_ready(component, 30)
        yield s.redis_url, password, component.pid()
    finally:
        component.stop()


def test_redis_with_requirepass_refuses_strangers_and_serves_driftline(infra, tmp_path, redis_with_password):
    url, password, pid = redis_with_password
    host, port = url.rsplit("@", 1)[1].split("/")[0].split(":")
    with pytest.raises(redis_lib.AuthenticationError):
        redis_lib.Redis(host=host, port=int(port)).set("x", 1)
    with open(f"/proc/{pid}/cmdline", "rb") as f:  # never on the command line, where `ps` shows it
        assert password.encode() not in f.read()
    s = make_settings(infra, tmp_path, redis_url=url)
    s.features.max_reorder_wait_ms = 50
    kafka.ensure_topics(s)
    publish(s, events=[event("p1", "a", 1.0, x=1.0), event("p2", "a", 2.0, x=2.0)])
    with running(s):
        vectors = read_topic(s, "features", 2)
    assert {v["event_id"] for v in vectors} == {"p1", "p2"}
    assert redis_lib.Redis.from_url(url).hget(Keys(s.namespace).entity("a"), "n") == b"2"


# -- Kafka with SASL/SCRAM and ACLs --------------------------------------------------------------------
@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory, infra):
    home = tmp_path_factory.mktemp("kafka-sasl")
    users = {"admin": "adm1n-" + uuid.uuid4().hex[:12], "app": "app-" + uuid.uuid4().hex[:12]}
    s = Settings(home=home, cache_dir=infra.cache_dir, kafka_bootstrap=f"127.0.0.1:{stack.free_port()}")
    broker = stack.Kafka(s, scram_users=users, acls=True)
    broker.start()

    def security(user, password=None):
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
                "sasl.username": user, "sasl.password": password or users[user]}

    admin_settings = s.model_copy(update={"kafka_security": security("admin")})
    try:
        deadline = time.monotonic() + 90
        while not stack.Kafka(admin_settings).ready():
            assert broker.running() and time.monotonic() < deadline, broker.log_tail()
            time.sleep(0.5)
        yield admin_settings, security
    finally:
        broker.stop()


@pytest.mark.e2e
def test_kafka_clients_authenticate_with_sasl_scram_and_obey_acls(sasl_broker, infra, tmp_path):
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    admin_settings, security = sasl_broker
    # without credentials, or with a wrong password, nothing answers
    for bad in ({}, security("app", "wrong-password")):
        with pytest.raises(KafkaException):
            kafka.admin(admin_settings.model_copy(update={"kafka_security": bad})).list_topics(timeout=5)
    app = make_settings(infra, tmp_path, kafka_bootstrap=admin_settings.kafka_bootstrap,
                        kafka_security=security("app"))
    app.features.max_reorder_wait_ms = 50
    kafka.ensure_topics(app.model_copy(update={"kafka_security": admin_settings.kafka_security}))
    topics = Topics(app.namespace)

    # the app user may do nothing before an ACL allows it
    p = kafka.producer(app, **{"message.timeout.ms": 5000})
    errors = []
    p.produce(topics.events_valid, b"x", on_delivery=lambda err, _m: errors.append(err))
    p.flush(10)
    assert errors and errors[0] is not None, errors

    def allow(resource, name, operation, pattern=ResourcePatternType.PREFIXED):
        return AclBinding(resource, name, pattern, "User:app", "*", operation, AclPermissionType.ALLOW)

    acls = [allow(ResourceType.TOPIC, app.namespace + ".", AclOperation.ALL),
            allow(ResourceType.GROUP, Topics(app.namespace).group(""), AclOperation.ALL),
            allow(ResourceType.BROKER, "kafka-cluster", AclOperation.IDEMPOTENT_WRITE, ResourcePatternType.LITERAL)]
    admin = kafka.admin(admin_settings)  # kept: the futures fail if their client goes first
    for future in admin.create_acls(acls).values():
        future.result(timeout=30)
    deadline = time.monotonic() + 60  # ACLs reach the authorizer asynchronously (metadata log),
    while True:  # all of one request at once: probe with a plain (non-idempotent) producer
        probe, errors = kafka.producer(app, **{"message.timeout.ms": 3000, "enable.idempotence": False}), []
        probe.produce(topics.events, b"probe", on_delivery=lambda err, _m: errors.append(err))
        probe.flush(5)
        if len(errors) == 1 and errors[0] is None:  # (KafkaError == None is an error in C)
            break
        assert time.monotonic() < deadline, errors
        time.sleep(1)

    # with them: a real service consumes, produces and commits as the app user
    publish(app, events=[event("s1", "a", 1.0, x=1.0), event("s2", "a", 2.0, x=2.0)])
    with running(app):
        vectors = read_topic(app.model_copy(update={"kafka_security": admin_settings.kafka_security}), "features", 2)
    assert {v["event_id"] for v in vectors} == {"s1", "s2"}
    # aiokafka (under faust) with the same settings: the same user, the same rights
    import asyncio

    from aiokafka import AIOKafkaProducer

    async def send_with_aiokafka():
        producer = AIOKafkaProducer(**kafka.aiokafka_options(app))
        await producer.start()
        try:
            return await producer.send_and_wait(topics.events, b"from aiokafka")
        finally:
            await producer.stop()

    assert asyncio.run(send_with_aiokafka()).topic == topics.events
    # and still nothing outside its prefix
    p = kafka.producer(app, **{"message.timeout.ms": 5000})
    errors.clear()
    p.produce(Topics("elsewhere").events_valid, b"x", on_delivery=lambda err, _m: errors.append(err))
    p.flush(10)
    assert errors and errors[0] is not None, errors
