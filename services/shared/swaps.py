"""Changing the champion: the one way to swap, roll back and publish it to `model.swaps`.

The registry role is the truth; the message tells the followers (every prediction replica, the
learner, drift) to look now instead of at their next reconcile. Publish AFTER the role is set,
never before: a follower that reads the message must find the new version in the registry.

    from_version = make_champion(registry, 2)      # checks the artifact's signature first
    publish_swap(producer, Topics(ns), model="default", from_version=from_version, to_version=2,
                 reason="manual")                  # True once Kafka has it

The learner's own promotions and the admin routes of the learner and the prediction service all go
through here, so they roll back to the same version and all check delivery.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Producer

from . import kafka, metrics
from .codec import get_codec
from .registry import ModelRegistry, UnknownVersion
from .topics import Topics

log = logging.getLogger(__name__)


def rollback_target(registry: ModelRegistry) -> int | None:
    """The version a rollback goes back to: the one the champion replaced when it was promoted,
    else the champion its challenger was built against (its parent); None without either."""
    champion = registry.champion()
    if champion is None:
        return None
    meta = registry.meta(champion)
    target = meta.get("replaced") or meta.get("parent")
    return int(target) if target is not None else None


def make_champion(registry: ModelRegistry, version: int) -> int | None:
    """Make `version` the champion in the registry (it stops shadowing if it was the challenger);
    returns the version it replaced. Raises UnknownVersion, or TamperedArtifact for an artifact
    that is missing its signature, before anything changes."""
    registry.load(version)  # the signature is checked before it can become anyone's champion
    from_version = registry.champion()
    registry.set_role("champion", version)
    if registry.challenger() == version:
        registry.set_role("challenger", None)
    return from_version


def publish_swap(producer: Producer, topics: Topics, *, model: str, from_version: int | None, to_version: int,
                 reason: str, position: int = 0, timeout: float = 12.0, service: str | None = None) -> bool:
    """Publish one ModelSwap and wait until Kafka has it; False if it did not take it in time.
    Counts the swap (`driftline_model_swaps_total`) and, for `service`, the message out."""
    metrics.MODEL_SWAPS.labels(model, reason).inc()
    record = {"model": model, "from_version": from_version, "to_version": to_version, "reason": reason,
              "position": position, "ts": time.time()}
    outcome: list = []
    kafka.produce(producer, topics.model_swaps, get_codec().encode("ModelSwap", record), key=model,
                  on_delivery=lambda err, _msg: outcome.append(err))
    left = producer.flush(timeout)
    if left or not outcome or outcome[0] is not None:
        log.error("model.swaps did not take the %s of %s to version %s (%s)", reason, model, to_version,
                  outcome[0] if outcome else "timeout")
        return False
    if service is not None:
        metrics.MESSAGES_OUT.labels(service, "model.swaps").inc()
    return True


def position_of(registry: ModelRegistry, version: int | None) -> int:
    """How far a version had learned (its examples seen), 0 when unknown: a swap's `position`."""
    if version is None:
        return 0
    try:
        return int(registry.meta(version).get("examples_seen", 0))
    except UnknownVersion:
        return 0
