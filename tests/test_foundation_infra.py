"""The local stack: `driftline infra up|down|status` on real Kafka and Redis."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import redis as redis_lib
from confluent_kafka.admin import AdminClient

from driftline.infra import stack
from driftline.shared.kafka import ensure_topics
from driftline.shared.settings import Settings, settings_env
from driftline.shared.topics import TOPIC_SPECS, Topics


def cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings_env(settings)}
    result = subprocess.run([sys.executable, "-m", "driftline.cli", *args], env=env, capture_output=True,
                            text=True, timeout=180)
    if check and result.returncode != 0:
        raise AssertionError(f"driftline {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def own_stack(tmp_path, infra_settings):
    """Settings for a second, private stack on fresh ports (the CLI under test starts it)."""
    s = Settings(
        kafka_bootstrap=f"127.0.0.1:{stack.free_port()}",
        redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
        home=tmp_path / "home",
        cache_dir=infra_settings.cache_dir,
    )
    yield s
    stack.down(s)


def test_infra_up_creates_every_topic_and_down_leaves_nothing_listening(own_stack):
    cli(own_stack, "infra", "up")
    topics = AdminClient({"bootstrap.servers": own_stack.kafka_bootstrap}).list_topics(timeout=10).topics
    for spec in TOPIC_SPECS:
        assert spec.name in topics, spec.name
        assert len(topics[spec.name].partitions) == spec.partition_count(own_stack.kafka_stream_partitions)
    assert redis_lib.Redis.from_url(own_stack.redis_url).ping()

    status = json.loads(cli(own_stack, "infra", "status", "--json").stdout)
    assert status["components"]["kafka"]["running"] and status["components"]["kafka"]["answers"]
    assert status["components"]["redis"]["answers"]
    assert status["components"]["kafka"]["version"] == stack.kafka_version()
    assert status["settings"]["kafka_bootstrap"] == own_stack.kafka_bootstrap

    cli(own_stack, "infra", "up")  # a second `up` is harmless
    assert "already running" in cli(own_stack, "infra", "up").stdout

    cli(own_stack, "infra", "down")
    for host, port in (own_stack.kafka_host_port, own_stack.redis_host_port):
        assert not stack.port_open(host, port), f"{host}:{port} still listening after down"
    status = json.loads(cli(own_stack, "infra", "status", "--json").stdout)
    assert not status["components"]["kafka"]["running"]
    assert not status["components"]["redis"]["running"]


def test_infra_up_on_a_taken_port_fails_clearly_instead_of_hanging(own_stack):
    host, port = own_stack.kafka_host_port
    squatter = socket.socket()
    squatter.bind((host, port))
    squatter.listen()
    try:
        result = cli(own_stack, "infra", "up", check=False)
    finally:
        squatter.close()
    assert result.returncode != 0
    assert "already taken" in result.stdout
    assert str(port) in result.stdout


def test_redis_keeps_data_across_a_restart_with_append_only_persistence(own_stack):
    stack.up(own_stack, create_topics=False)
    client = redis_lib.Redis.from_url(own_stack.redis_url)
    client.set("dl:persist-check", "kept")
    client.close()
    stack.Redis(own_stack).stop()
    stack.up(own_stack, create_topics=False)
    assert redis_lib.Redis.from_url(own_stack.redis_url).get("dl:persist-check") == b"kept"


def test_topic_creation_is_idempotent(settings):
    # The `settings` fixture created the namespace's topics already.
    assert ensure_topics(settings) == []
    topics = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(timeout=10).topics
    assert set(Topics(settings.namespace).all()) <= set(topics)
