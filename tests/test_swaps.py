"""The one swap/rollback path (`shared.swaps`) against a real Redis registry and Kafka: the learner's
admin routes, its promotions and the prediction service all go through it."""

from __future__ import annotations

import pytest
from river import dummy

from driftline.shared import kafka
from driftline.shared.keys import Keys
from driftline.shared.registry import ModelRegistry, TamperedArtifact, UnknownVersion
from driftline.shared.swaps import make_champion, position_of, publish_swap, rollback_target
from driftline.shared.topics import Topics

from learner_harness import read_all


@pytest.fixture
def registry(settings, redis_client) -> ModelRegistry:
    return ModelRegistry(redis_client, Keys(settings.namespace), "m", b"key")


def test_rollback_goes_to_the_version_a_promotion_replaced_else_the_parent(registry):
    assert rollback_target(registry) is None  # no champion yet
    v1 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="initial")
    registry.set_role("champion", v1)
    assert rollback_target(registry) is None  # nothing before it
    v2 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="concept_drift", parent=v1)
    v3 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="concept_drift", parent=v1)
    registry.set_role("champion", v2)
    assert rollback_target(registry) == v1  # the parent
    registry.annotate(v3, replaced=v2)
    registry.set_role("champion", v3)
    assert rollback_target(registry) == v2  # what it replaced wins over its parent


def test_make_champion_checks_the_artifact_first_and_ends_the_shadowing(registry, redis_client, settings):
    v1 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="initial", examples_seen=7)
    v2 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="demand", parent=v1)
    registry.set_role("champion", v1)
    registry.set_role("challenger", v2)
    with pytest.raises(UnknownVersion):
        make_champion(registry, 99)
    redis_client.set(Keys(settings.namespace).registry_artifact("m", v2), b"not signed")
    with pytest.raises(TamperedArtifact):
        make_champion(registry, v2)
    assert (registry.champion(), registry.challenger()) == (v1, v2)  # nothing changed
    registry.update(v2, dummy.NoChangeClassifier(), examples_seen=0)
    assert make_champion(registry, v2) == v1
    assert (registry.champion(), registry.challenger()) == (v2, None)
    assert position_of(registry, v1) == 7 and position_of(registry, None) == 0


def test_publish_swap_waits_for_kafka_and_says_whether_it_took_it(settings):
    topics = Topics(settings.namespace)
    assert publish_swap(kafka.producer(settings), topics, model="m", from_version=1, to_version=2, reason="manual",
                        position=5)
    swaps = read_all(settings, topics.model_swaps, "ModelSwap", until=lambda s: len(s) >= 1)
    assert [(s["model"], s["from_version"], s["to_version"], s["reason"], s["position"]) for s in swaps] == [
        ("m", 1, 2, "manual", 5)]
