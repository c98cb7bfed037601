"""Publishing a champion change to `model.swaps` (every prediction replica and worker follows it).

The registry role is the truth; the message tells the followers to look now instead of at their
next reconcile. Publish AFTER `registry.set_role("champion", v)`, never before: a follower that
reads the message must find the new version in the registry.

    >>> registry.set_role("champion", 2)
    >>> publish_swap(producer, Topics(ns), model="default", from_version=1, to_version=2, reason="manual")
    True
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Producer

from ..shared import kafka
from ..shared.codec import get_codec
from ..shared.topics import Topics

log = logging.getLogger(__name__)


def publish_swap(producer: Producer, topics: Topics, *, model: str, from_version: int | None, to_version: int,
                 reason: str, position: int = 0, timeout: float = 12.0) -> bool:
    """Publish one ModelSwap and wait until Kafka has it; False if it did not take it in time."""
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
    return True
