"""Registry retention against a real Redis: the drift loop registers a version for every challenger
it tries, and the artifacts nothing needs any more are deleted beyond the newest
`learner.keep_versions`, never one that a role, the learner or a rollback needs."""

from __future__ import annotations

import json

import pytest
from river import dummy

from driftline.shared.keys import Keys
from driftline.shared.registry import ModelRegistry, PrunedArtifact, UnknownVersion
from driftline.shared.swaps import make_champion, rollback_target


@pytest.fixture
def registry(settings, redis_client) -> ModelRegistry:
    return ModelRegistry(redis_client, Keys(settings.namespace), "m", b"key")


def register(registry: ModelRegistry, n: int, parent: int | None = None) -> list[int]:
    return [registry.register(dummy.NoChangeClassifier(), spec="s", reason="concept_drift", parent=parent)
            for _ in range(n)]


def stored(registry: ModelRegistry, redis_client) -> set[int]:
    return {m["version"] for m in registry.versions()
            if redis_client.exists(registry.keys.registry_artifact("m", m["version"]))}


def test_prune_keeps_the_newest_the_roles_the_learners_slots_and_the_champions_line(registry, redis_client):
    v1 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="initial")
    registry.set_role("champion", v1)
    losers = register(registry, 5, parent=v1)  # challengers that lost their contests: 2..6
    v7 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="concept_drift", parent=v1)
    registry.annotate(v7, replaced=v1)
    registry.set_role("champion", v7)  # promoted over v1: v1 is what a rollback goes back to
    newer = register(registry, 6, parent=v7)  # 8..13
    registry.set_role("challenger", newer[-1])
    shadowing = losers[1]  # the learner still holds it (say, a displaced champion that shadows)

    pruned = registry.prune(3, protect={shadowing})

    assert sorted(pruned) == sorted([*losers[:1], *losers[2:], *newer[:3]])
    assert stored(registry, redis_client) == {v1, shadowing, v7, *newer[3:]}
    assert registry.prune(3, protect={shadowing}) == []  # nothing more to do
    assert rollback_target(registry) == v1 and make_champion(registry, v1) == v7  # the rollback still works
    # Every version's lineage stays; a pruned artifact is refused, and says why.
    assert len(registry.versions()) == 13 and registry.meta(losers[0])["pruned_at"] > 0
    with pytest.raises(PrunedArtifact, match="pruned by retention"):
        registry.load(losers[0])
    with pytest.raises(PrunedArtifact):
        registry.set_role("champion", losers[0])  # never a champion without its artifact
    with pytest.raises(UnknownVersion) as unknown:
        registry.load(99)
    assert not isinstance(unknown.value, PrunedArtifact)


def test_a_version_saved_again_after_its_prune_is_kept_again(registry, redis_client):
    # A learner restarted from a checkpoint older than a drop re-decides it and saves the version again.
    v1 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="initial")
    registry.set_role("champion", v1)
    v2, *_ = register(registry, 4, parent=v1)
    assert v2 in registry.prune(2)
    registry.update(v2, dummy.NoChangeClassifier(), examples_seen=3)
    model, meta = registry.load(v2)
    assert "pruned_at" not in meta and v2 in stored(registry, redis_client)
    assert registry.prune(2) == [v2]  # and counted among what retention may prune again


def test_requests_are_indexed_and_a_registry_from_before_the_indexes_is_indexed_once(registry, redis_client,
                                                                                   settings):
    v1 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="initial")
    v2, v3 = register(registry, 2, parent=v1)
    registry.annotate(v2, request_id="req-a")
    assert registry.version_of_request("req-a") == v2 and registry.version_of_request("req-b") is None
    # As an older driftline left it: lineage records with request ids, no indexes.
    registry.annotate(v3, request_id="req-c")
    redis_client.delete(registry.keys.registry_kept("m"), registry.keys.registry_requests("m"))
    redis_client.delete(registry.keys.registry_artifact("m", v1))  # an artifact that is gone already
    older = ModelRegistry(redis_client, Keys(settings.namespace), "m", b"key")
    assert older.version_of_request("req-c") == v3 and older.version_of_request("req-a") == v2
    assert [int(v) for v in redis_client.zrange(registry.keys.registry_kept("m"), 0, -1)] == [v2, v3]
    assert json.loads(redis_client.hget(registry.keys.registry_versions("m"), str(v3)))["request_id"] == "req-c"


def test_lineage_records_beyond_the_newest_are_forgotten_unless_a_role_or_a_line_needs_them(registry, redis_client):
    v1 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="initial")
    registry.set_role("champion", v1)
    losers = register(registry, 5, parent=v1)  # 2..6, each for a retrain request
    for i, v in enumerate(losers):
        registry.annotate(v, request_id=f"req-{i}")
    v7 = registry.register(dummy.NoChangeClassifier(), spec="s", reason="concept_drift", parent=v1)
    registry.annotate(v7, replaced=v1)
    registry.set_role("champion", v7)
    newer = register(registry, 6, parent=v7)  # 8..13
    shadowing = losers[1]
    assert registry.forget(3, protect={shadowing}) == []  # every artifact is still stored: nothing to forget

    registry.prune(3, protect={shadowing})
    forgotten = registry.forget(3, protect={shadowing})

    # The records of pruned versions older than the newest 3 go, but not the champion's line (v7,
    # and v1, which a rollback goes back to) nor what the learner holds.
    assert sorted(forgotten) == sorted([losers[0], *losers[2:], *newer[:3]])
    assert [m["version"] for m in registry.versions()] == [v1, shadowing, v7, *newer[3:]]
    assert registry.count() == 6 and registry.forget(3, protect={shadowing}) == []
    assert registry.version_of_request("req-0") is None and registry.version_of_request("req-1") == shadowing
    with pytest.raises(UnknownVersion):
        registry.meta(losers[0])
    assert rollback_target(registry) == v1 and make_champion(registry, v1) == v7
    # Listing the newest: oldest first, as many as asked.
    assert [m["version"] for m in registry.versions(2)] == newer[4:]
    assert [m["version"] for m in registry.versions(100)] == [v1, shadowing, v7, *newer[3:]]
    newest, total = registry.listing(2)  # /v1/models: the newest and the count, read together
    assert [m["version"] for m in newest] == newer[4:] and total == registry.count() == 6
