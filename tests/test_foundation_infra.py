"""The local stack: `driftline infra up|down|status` on real Kafka and Redis."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import redis as redis_lib
from confluent_kafka import TopicPartition
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


def test_dropping_a_namespace_deletes_its_internal_topics_groups_and_keys_and_nothing_else(settings, infra):
    from confluent_kafka import Consumer
    from confluent_kafka.admin import NewTopic

    from driftline.replay.demo import _drop_namespace

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    ours, other = Topics(settings.namespace), Topics(settings.namespace + "0")  # ours is a prefix of its name
    created = [ours.keyed("merchant", 0), ours.keyed("entity_id", 0), other.name("events")]
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in created]).values():
        future.result(timeout=30)
    groups = [ours.group("learner"), other.group("learner")]
    for group in groups:  # a group the broker keeps: one with a committed offset
        consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
        consumer.commit(offsets=[TopicPartition(ours.events, 0, 0)], asynchronous=False)
        consumer.close()
    client = redis_lib.Redis.from_url(settings.redis_url)
    client.set(f"dl:{settings.namespace}:x", 1)
    client.set(f"dl:{settings.namespace}0:x", 1)

    _drop_namespace(settings)

    left = set(admin.list_topics(timeout=10).topics)
    assert not [t for t in left if t.startswith(f"{settings.namespace}.")], left
    assert other.name("events") in left
    listed = {g.group_id for g in admin.list_consumer_groups().result(timeout=10).valid}
    assert ours.group("learner") not in listed and other.group("learner") in listed
    assert client.keys(f"dl:{settings.namespace}:*") == [] and client.get(f"dl:{settings.namespace}0:x") == b"1"
    admin.delete_topics([other.name("events")])
    admin.delete_consumer_groups([other.group("learner")])
    client.delete(f"dl:{settings.namespace}0:x")
    client.close()
