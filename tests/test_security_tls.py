"""TLS proven against the real servers: one Kafka broker with an SSL listener (client certificates
required) and a SASL_SSL listener (SCRAM inside TLS), and a Redis that speaks TLS only, all on a CA
this test makes with openssl. Strangers are refused at each; every service runs a stream through
them, with client tokens on the HTTP doors and the admin audit written to a file."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest
import redis as redis_lib
from confluent_kafka import KafkaException

from driftline.infra import stack
from driftline.shared import kafka
from driftline.shared.settings import Settings, settings_env
from driftline.shared.topics import Topics
from conftest import ServiceProcess, make_settings
from pipeline import ALL, replay_report
from tls import Certificates, make_certificates

pytestmark = pytest.mark.e2e

ROWS = 400
INGEST_TOKEN = "ingest-" + uuid.uuid4().hex
PREDICT_TOKEN = "predict-" + uuid.uuid4().hex
ADMIN_TOKEN = "ops-" + uuid.uuid4().hex


@dataclass
class TlsStack:
    certs: Certificates
    ssl_port: int
    sasl_port: int
    users: dict[str, str]  # SCRAM users: admin (the broker's own), app
    base: Settings | None = None  # the broker's and Redis' own settings (SSL listener, rediss:// URL)

    def client(self, listener: str, **security: str) -> dict[str, str]:
        """Where and how a client connects to `listener`: (kafka_bootstrap, kafka_security) overrides."""
        if listener == "SSL":
            sec = {"security.protocol": "SSL", "ssl.ca.location": str(self.certs.ca),
                   "ssl.certificate.location": str(self.certs.client_cert),
                   "ssl.key.location": str(self.certs.client_key)}
        else:
            sec = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "app",
                   "sasl.password": self.users["app"], "ssl.ca.location": str(self.certs.ca)}
        sec = {k: v for k, v in {**sec, **security}.items() if v is not None}
        port = self.ssl_port if listener == "SSL" else self.sasl_port
        return {"kafka_bootstrap": f"127.0.0.1:{port}", "kafka_security": sec}


@pytest.fixture(scope="module")
def tls_stack(infra, tmp_path_factory):
    home = tmp_path_factory.mktemp("tls")
    certs = make_certificates(home / "certs")
    ssl_port, sasl_port, redis_port = stack.free_port(), stack.free_port(), stack.free_port()
    users = {"admin": "adm1n-" + uuid.uuid4().hex[:12], "app": "app-" + uuid.uuid4().hex[:12]}
    password = "r3dis-" + uuid.uuid4().hex
    tls = TlsStack(certs, ssl_port, sasl_port, users)
    tls.base = Settings(home=home, cache_dir=infra.cache_dir, **tls.client("SSL"),
                        redis_url=f"rediss://:{password}@127.0.0.1:{redis_port}/0?ssl_ca_certs={certs.ca}")
    broker = stack.Kafka(tls.base, scram_users=users, tls=certs.server,
                         listeners={"SSL": ssl_port, "SASL_SSL": sasl_port})
    server = stack.Redis(tls.base, tls=certs.server)
    try:
        server.start()
        broker.start()
        stack.wait_ready(server, 30)
        stack.wait_ready(broker, 120)
        yield tls
    finally:
        broker.stop()
        server.stop()


def test_the_broker_refuses_whoever_cannot_prove_itself(tls_stack):
    tls = tls_stack
    for listener in ("SSL", "SASL_SSL"):  # both answer the right client
        assert kafka.admin(tls.base.model_copy(update=tls.client(listener))).list_topics(timeout=20).brokers
    strangers = {
        "plain text to the SSL listener": tls.client("SSL", **{"security.protocol": "PLAINTEXT"}),
        "a client that trusts another CA": tls.client("SSL", **{"ssl.ca.location": str(tls.certs.stranger_ca)}),
        "no client certificate": tls.client("SSL", **{"ssl.certificate.location": None, "ssl.key.location": None}),
        "a wrong SCRAM password": tls.client("SASL_SSL", **{"sasl.password": "wrong-" + uuid.uuid4().hex}),
        "SCRAM without TLS": tls.client("SASL_SSL", **{"security.protocol": "SASL_PLAINTEXT"}),
    }
    for what, client in strangers.items():
        with pytest.raises(KafkaException):
            kafka.admin(tls.base.model_copy(update=client)).list_topics(timeout=3)
            pytest.fail(f"the broker answered {what}")


def test_aiokafka_speaks_both_listeners_with_the_same_settings(tls_stack):
    from aiokafka import AIOKafkaProducer

    tls = tls_stack
    s = tls.base.model_copy(update={"namespace": f"t{uuid.uuid4().hex[:10]}"})
    kafka.ensure_topics(s)
    topic = Topics(s.namespace).events

    async def send(settings: Settings) -> str:
        producer = AIOKafkaProducer(**kafka.aiokafka_options(settings))
        await producer.start()
        try:
            return (await producer.send_and_wait(topic, b"over tls")).topic
        finally:
            await producer.stop()

    for listener in ("SSL", "SASL_SSL"):
        assert asyncio.run(send(s.model_copy(update=tls.client(listener)))) == topic, listener


def test_redis_speaks_tls_only_and_checks_who_it_talks_to(tls_stack):
    url = tls_stack.base.redis_url
    host, port = tls_stack.base.redis_host_port
    with pytest.raises(redis_lib.ConnectionError):  # plain text to the TLS port
        redis_lib.Redis(host=host, port=port, socket_timeout=3).ping()
    without_ca = url.split("?")[0]
    with pytest.raises(redis_lib.ConnectionError, match="certificate verify failed"):
        redis_lib.Redis.from_url(without_ca, socket_timeout=3).ping()
    with pytest.raises(redis_lib.AuthenticationError):
        redis_lib.Redis.from_url(url.replace(url.split("@")[0] + "@", "rediss://"), socket_timeout=3).set("x", 1)
    assert redis_lib.Redis.from_url(url).ping()

    async def ping() -> bool:  # the prediction service's client
        client = redis_lib.asyncio.Redis.from_url(url)
        try:
            return await client.ping()
        finally:
            await client.aclose()

    assert asyncio.run(ping())


@pytest.fixture
def services(tmp_path):
    """`services(settings, names)`: start `driftline serve NAME` for each with exactly these settings."""
    started: list[ServiceProcess] = []

    def start(settings: Settings, names=ALL) -> dict[str, ServiceProcess]:
        env = {**os.environ, **settings_env(settings)}
        procs = {name: ServiceProcess(name, settings, env, tmp_path / f"{name}.log").start(wait=False)
                 for name in names}
        started.extend(procs.values())
        for proc in procs.values():
            proc.wait_healthy(120)
        return procs

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.mark.parametrize("listener", ["SSL", "SASL_SSL"])
def test_every_service_runs_the_stream_over_tls_behind_tokens(tls_stack, infra, tmp_path, services, listener):
    tls = tls_stack
    s = make_settings(infra, tmp_path, **tls.client(listener), redis_url=tls.base.redis_url,
                      ingest_tokens=[{"name": "producer", "token": INGEST_TOKEN}],
                      predict_tokens=[{"name": "shop", "token": PREDICT_TOKEN}],
                      admin_token=f'[{{"name": "ops", "token": "{ADMIN_TOKEN}"}}]', audit_log=tmp_path / "audit.jsonl")
    kafka.ensure_topics(s)
    procs = services(s)

    report = replay_report(s, "sea-abrupt", limit=ROWS, label_delay=10, stall_timeout_s=90)
    assert report["examples_learned"] == report["labels_sent"] == ROWS and report["events_dlq"] == 0
    deadline = time.monotonic() + 60  # the drift service read every outcome through the broker
    while (drift := httpx.get(procs["drift"].url + "/v1/drift").json())["position"] < ROWS - 1:
        assert time.monotonic() < deadline, drift
        time.sleep(0.5)

    event = {"event_id": f"http-{uuid.uuid4().hex}", "entity_id": "e", "ts": time.time(), "fields": {"x": 1.0}}
    door = procs["ingestion"].url + "/v1/events"
    assert httpx.post(door, json=event).status_code == 401
    r = httpx.post(door, json=event, headers={"Authorization": f"Bearer {INGEST_TOKEN}"})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text

    predict = procs["prediction"].url + "/v1/predict"
    request = {"entity_id": "e", "fields": {"x": 1.0}}
    assert httpx.post(predict, json=request).status_code == 401
    deadline = time.monotonic() + 60
    while (r := httpx.post(predict, json=request, headers={"Authorization": f"Bearer {PREDICT_TOKEN}"})).status_code == 503:
        assert time.monotonic() < deadline, r.text  # until the served model is loaded from Redis
        time.sleep(0.5)
    assert r.status_code == 200 and r.json()["model_version"] >= 1, r.text

    canary = procs["prediction"].url + "/v1/canary"
    assert httpx.post(canary, json={"share": 0.0}).status_code == 401
    r = httpx.post(canary, json={"share": 0.0}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200, r.text
    trail = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["action"], e["who"], e["outcome"]) for e in trail] == [
        ("canary_share", "unknown", "refused"), ("canary_share", "ops", "done")]
    assert ADMIN_TOKEN not in (tmp_path / "audit.jsonl").read_text()
