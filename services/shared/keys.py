"""The Redis key layout, defined once.

Every key starts with `dl:` plus the namespace, and carries a hash tag (`{...}`): a Redis Cluster
hashes only the tag, so what one script or multi-key command touches must share it. An entity's
state is tagged by entity id, an event's snapshot and first-seen claims by event id, a model's
registry, lease, checkpoint and sets by model name (its lease and checkpoint are written by one
script; a version's artifact and lineage in one transaction).

The rule for a new key: build it here, with a hash tag naming what it belongs to (`_tagged`),
and give a script or a multi-key command only keys of one tag -- or split the call per slot
(`redis_clients.slot_groups`), as the batch scripts of the feature store and of dedup do. A
unit test checks that every key built here has a tag.

    >>> Keys("").entity("meter-7")
    'dl:ent:{meter-7}'
    >>> Keys("t1").snapshot("e-1")
    'dl:t1:snap:{e-1}'
"""

from __future__ import annotations


class Keys:
    def __init__(self, namespace: str = "") -> None:
        if "{" in namespace or "}" in namespace:  # a brace before the tag would become the tag
            raise ValueError(f"a namespace has no braces: {namespace!r}")
        self.prefix = f"dl:{namespace}:" if namespace else "dl:"

    def _tagged(self, kind: str, tag: str, rest: str = "") -> str:
        """`dl:<namespace>:<kind>:{<tag>}[:<rest>]`: the key's slot follows `tag` alone."""
        return f"{self.prefix}{kind}:{{{tag}}}" + (f":{rest}" if rest else "")

    # -- features: per-entity state and per-event snapshots ---------------------------------
    def entity(self, entity_id: str) -> str:
        """Hash: the entity's online state (counts, last values, EWMs, last label, offsets)."""
        return self._tagged("ent", entity_id)

    def keyed_entity(self, key: str, value: str) -> str:
        """Hash: the state of an entity that another field of events names (`merchant` = `m-17`):
        its windowed aggregates, written by every worker whose events name it.

            >>> Keys("").keyed_entity("merchant", "m-17")
            'dl:key:{merchant=m-17}'
        """
        return self._tagged("key", f"{key}={value}")

    def snapshot(self, event_id: str) -> str:
        """Hash: the feature vector an event was scored with (+ its prediction), kept with a TTL
        until its label comes."""
        return self._tagged("snap", event_id)

    def features_applied(self) -> str:
        """Hash "topic/partition" -> the next offset whose effects on the entity states are in
        Redis (written last in each batch's pipeline: if it survived a Redis crash, so did the
        states before it). Behind the committed offset = Redis lost writes: re-read from Kafka."""
        return self._tagged("features", "applied")

    def features_order(self) -> str:
        """Hash "topic/partition" (of events.valid) -> the latest event time of the partition up to
        the applied offset: the merge time its events carry to the key fields' stages (written with
        the applied offsets, so that a restart goes on from the same value; docs/features.md).

            >>> Keys("").features_order()
            'dl:features:{order}'
        """
        return self._tagged("features", "order")

    # -- ingestion: de-duplication ---------------------------------------------------------
    def seen_event(self, event_id: str) -> str:
        return self._tagged("seen:ev", event_id)

    def seen_label(self, event_id: str) -> str:
        return self._tagged("seen:lb", event_id)

    # -- learner and registry: one hash tag per model ----------------------------------------
    def _model(self, model: str, what: str) -> str:
        return self._tagged("model", model, what)

    def registry_versions(self, model: str) -> str:
        """Hash: version -> lineage JSON."""
        return self._model(model, "versions")

    def registry_kept(self, model: str) -> str:
        """Sorted set: the versions whose artifact is stored, scored by number (retention)."""
        return self._model(model, "kept")

    def registry_requests(self, model: str) -> str:
        """Hash: retrain request id -> the version registered for it."""
        return self._model(model, "requests")

    def registry_artifact(self, model: str, version: int) -> str:
        """String: the signed model artifact of one version."""
        return self._model(model, f"artifact:{version}")

    def registry_seq(self, model: str) -> str:
        return self._model(model, "seq")

    def registry_roles(self, model: str) -> str:
        """Hash: champion -> version, challenger -> version."""
        return self._model(model, "roles")

    def checkpoint(self, model: str) -> str:
        return self._model(model, "checkpoint")

    def lease(self, model: str) -> str:
        return self._model(model, "lease")

    def example_buffer(self, model: str) -> str:
        """List: the warm-start buffer as learners kept it before it moved into the checkpoint
        (read once when such an older checkpoint is restored)."""
        return self._model(model, "buffer")

    def field_names(self, model: str) -> str:
        """Set: every event field name this model's features were ever built from (bounded by
        features.max_feature_names)."""
        return self._model(model, "fields")

    def categories(self, model: str, field: str) -> str:
        """Set: every text value this model's field `field` ever took (bounded by features.max_categories)."""
        return self._model(model, f"categories:{field}")

    def drift_state(self, model: str) -> str:
        return self._model(model, "drift")

    def canary(self, model: str) -> str:
        """Hash: share (of /v1/predict routed to the challenger), version, rolled_back (why)."""
        return self._model(model, "canary")
