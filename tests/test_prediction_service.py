"""The prediction service as it runs in production (`driftline serve prediction`, its own process)
against the real Kafka and Redis: a hot swap under concurrent load, answering while Kafka is down,
and schemathesis fuzzing its own OpenAPI for server errors."""

from __future__ import annotations

import asyncio
import os
import random
import re
import time

import httpx
import pytest
import redis as redis_lib
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr
from schemathesis import GenerationMode

from driftline.infra.stack import free_port
from driftline.shared.swaps import publish_swap
from driftline.shared import kafka
from driftline.shared.topics import Topics
from conftest import ServiceProcess, make_settings
from driftline.shared.settings import settings_env
from test_prediction_api import TOKEN, create_topics, expected_proba, register, registry_of, wait_for


def wait_ready(url: str, timeout: float = 60.0) -> None:
    wait_for(lambda: httpx.get(url + "/ready", timeout=3.0).status_code == 200, timeout, what=f"{url}/ready")


def start_service(s, log_path, **env) -> ServiceProcess:
    proc_env = {**os.environ, **settings_env(s), **env}
    return ServiceProcess("prediction", s, proc_env, log_path).start(wait=False)


@pytest.fixture(scope="module")
def settings(infra, tmp_path_factory):
    """One namespace for the module (topics created once), with an admin token."""
    s = make_settings(infra, tmp_path_factory.mktemp("prediction-svc"), admin_token=SecretStr(TOKEN))
    create_topics(s)
    return s


@pytest.fixture(scope="module")
def redis_client(settings):
    client = redis_lib.Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def services(settings, redis_client, tmp_path_factory):
    """Two `driftline serve prediction` processes for the module, started together: one as in
    production, one whose Kafka is a dead port (with a 500 ms log timeout) serving a model of its
    own name. Both have a champion."""
    register(settings, redis_client, seed=3)
    dead_kafka = settings.model_copy(update={
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "ports": settings.ports.model_copy(update={"prediction": free_port()}),
        "learner": settings.learner.model_copy(update={"model_name": "orphan"})})
    register(dead_kafka, redis_client, seed=5)
    logs = tmp_path_factory.mktemp("logs")
    normal = start_service(settings, logs / "prediction.log")
    orphan = start_service(dead_kafka, logs / "prediction-dead-kafka.log", DRIFTLINE_PREDICTION__LOG_TIMEOUT_MS="500")
    try:
        normal.wait_healthy()
        orphan.wait_healthy()
        wait_ready(normal.url)
        yield normal, orphan
    finally:
        normal.stop()
        orphan.stop()


@pytest.fixture(scope="module")
def service(services):
    return services[0]


def test_hot_swap_under_concurrent_load_fails_nothing_and_never_mixes_versions(settings, redis_client, service):
    v1, model1 = register(settings, redis_client, seed=1)
    v2, model2 = register(settings, redis_client, seed=2, champion=False, parent=v1)
    publish_swap(kafka.producer(settings), Topics(settings.namespace), model="default", from_version=None,
                 to_version=v1, reason="manual")
    wait_for(lambda: httpx.get(service.url + "/v1/models").json()["serving"] == v1, what=f"version {v1}")

    rng = random.Random(7)
    inputs = [{"a": rng.uniform(-1, 1), "b": rng.uniform(-1, 1)} for _ in range(40)]
    expected = {v1: [expected_proba(model1, {}, x, 0.0) for x in inputs],
                v2: [expected_proba(model2, {}, x, 0.0) for x in inputs]}
    assert expected[v1] != expected[v2]  # otherwise a mixed answer could not be told apart

    results: list[tuple[float, int, int, dict]] = []  # (started, input index, version, proba)
    failures: list[str] = []
    swap_sent: list[float] = []
    max_requests, concurrency = 6000, 16

    async def client_loop(client: httpx.AsyncClient) -> None:
        while len(results) + len(failures) < max_requests:
            if swap_sent and time.monotonic() > swap_sent[0] + 1.5:
                return  # enough answers after the swap
            i = rng.randrange(len(inputs))
            started = time.monotonic()
            try:
                r = await client.post("/v1/predict", json={"entity_id": f"new-{i}", "fields": inputs[i], "ts": 0.0})
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text}")
                continue
            body = r.json()
            results.append((started, i, body["model_version"], body["proba"]))

    async def swap_after_warmup() -> None:
        while len(results) < 200 and not failures:
            await asyncio.sleep(0.01)
        registry_of(settings, redis_client).set_role("champion", v2)
        assert await asyncio.to_thread(publish_swap, kafka.producer(settings), Topics(settings.namespace),
                                       model="default", from_version=v1, to_version=v2, reason="promotion")
        swap_sent.append(time.monotonic())  # the message is in Kafka now

    async def main() -> None:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=service.url, limits=limits, timeout=10.0) as client:
            await asyncio.gather(swap_after_warmup(), *(client_loop(client) for _ in range(concurrency)))

    asyncio.run(main())

    assert failures == []
    assert swap_sent, "the swap was never published"
    versions = {version for _, _, version, _ in results}
    assert versions == {v1, v2}
    for _started, i, version, proba in results:  # each answer is wholly the model it names
        assert proba == pytest.approx(expected[version][i], abs=1e-12)
    late = [version for started, _, version, _ in results if started > swap_sent[0] + 1.0]
    assert late, "no request was made a second after the swap"
    assert set(late) == {v2}, f"{late.count(v1)} requests made >1 s after the swap still got version {v1}"


def test_with_kafka_down_it_keeps_answering_and_counts_the_predictions_it_could_not_log(
        settings, redis_client, services):
    service = services[1]
    version = registry_of(service.settings, redis_client).champion()
    ready = httpx.get(service.url + "/ready", timeout=10)
    assert ready.status_code == 503
    assert any("kafka does not answer" in reason for reason in ready.json()["reasons"])
    with httpx.Client(base_url=service.url) as client:
        for i in range(12):
            r = client.post("/v1/predict", json={"entity_id": "e", "fields": {"a": 0.1 * i}, "event_id": f"ev-{i}"})
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == version

        def dropped() -> float:
            text = client.get("/metrics").text
            return sum(float(v) for v in re.findall(r'^driftline_prediction_log_dropped_total\{[^}]*\} (\S+)$',
                                                    text, re.M))

        wait_for(lambda: dropped() >= 12, timeout=15, what="12 dropped predictions counted")
        assert dropped() == 12
    # The learning-loop join does not depend on Kafka: the snapshots were kept.
    assert redis_client.exists(*(f"dl:{settings.namespace}:snap:{{ev-{i}}}" for i in range(12))) == 12


def test_schemathesis_finds_no_server_error_in_the_openapi(service):
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    server_errors: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/predict", "/v1/predict/batch", "/v1/models",
                                              "/v1/models/rollback", "/v1/models/{version}/promote", "/ready"}
    for op in operations:
        modes = [GenerationMode.POSITIVE]
        if op.body or op.path_parameters:  # something to break
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            @given(case=op.as_strategy(generation_mode=mode))
            @hypothesis_settings(max_examples=15, deadline=None, database=None,
                                 suppress_health_check=list(HealthCheck))
            def fuzz(case):
                response = case.call(base_url=service.url, timeout=10)
                if response.status_code >= 500:
                    server_errors.append(f"{case.method} {case.formatted_path} {case.body!r} -> "
                                         f"{response.status_code} {response.text[:200]}")

            try:
                fuzz()
            except Unsatisfiable:  # a negative mode with nothing it can break in this operation
                assert mode is GenerationMode.NEGATIVE
    assert server_errors == [], "\n".join(server_errors[:10])
    assert httpx.get(service.url + "/health").status_code == 200
