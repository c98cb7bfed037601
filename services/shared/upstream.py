"""Has the service before us read everything published so far? Asked of the broker: the upstream
group's committed offsets against the ends of its input partitions.

A partition of ours read to its end says only that nothing has *reached* us: records may still be
inside the service before us (read, not yet written on). That service commits only after the
broker acknowledged what it wrote, so once its group has committed to the end of its inputs,
everything published before the question is on our side of it.

    drained = UpstreamDrained(settings, group="driftline-ingestion", topic="events")
    if at_end and drained():       # nothing on its way: what comes next is published later
        ...

A "no" is kept for `check_s` (asked at most that often while the stream flows), a "yes" never (the
next record may be published right after it). While the broker is away the answer is "no"
without asking, and a failed question is asked again only after a backoff: nothing is given up
on while it cannot be asked, and the caller's loop never waits long on an absent broker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from confluent_kafka import Consumer, TopicPartition

from . import kafka
from .deps import DEPS, backoff_delays
from .settings import Settings

log = logging.getLogger(__name__)


class UpstreamDrained:
    def __init__(self, settings: Settings, group: str, topic: str, check_s: float = 0.5,
                 timeout_s: float = 2.0) -> None:
        self.settings = settings
        self.group = group
        self.topic = topic
        self.check_s = check_s
        self.timeout_s = timeout_s
        self.consumer: Consumer | None = None  # in the upstream group; never subscribes: reads commits
        self.admin = None  # asks for the partitions' ends (made when first needed)
        self.parts: list[TopicPartition] | None = None
        self.checked_at = -1e9
        self.retry_at = 0.0
        self.delays = None

    def __call__(self) -> bool:
        return self.ends_if_drained() is not None

    def ends_if_drained(self, ours: Iterable[TopicPartition] = ()) -> dict[tuple[str, int], int] | None:
        """None unless drained; then the ends of `ours` (partitions after the upstream service), asked
        in the same request as its inputs' ends: after its commits, so whatever it wrote before
        committing is below them."""
        now = time.monotonic()
        if now - self.checked_at < self.check_s or now < self.retry_at:
            return None
        self.checked_at = now
        if DEPS.is_down("kafka"):
            return None
        try:
            if self.consumer is None:
                self.consumer = kafka.consumer(self.settings, self.group)
            if self.parts is None:
                self.parts = [TopicPartition(self.topic, tp.partition)
                              for tp in kafka.partitions_of(self.settings, self.topic, timeout=self.timeout_s)]
            committed = self.consumer.committed(self.parts, timeout=self.timeout_s)
            if self.admin is None:
                self.admin = kafka.admin(self.settings)
            # Asked after the commits: a record published in between makes it "no", never a wrong "yes".
            ends = kafka.ends(self.admin, [*committed, *ours], self.timeout_s)
            if any(ends[(tp.topic, tp.partition)] > max(tp.offset, 0) for tp in committed):
                return None
        except Exception:  # the broker away: nothing is taken as drained while it cannot be asked
            log.debug("%s's offsets on %s unavailable", self.group, self.topic, exc_info=True)
            self.delays = self.delays or backoff_delays()
            self.retry_at = time.monotonic() + next(self.delays)
            self.close()
            return None
        self.delays = None
        self.checked_at = -1e9  # a "yes" is not kept
        return ends

    def close(self) -> None:
        if self.consumer is not None:
            kafka.close_quietly(self.consumer)
            self.consumer = None
        self.admin = None
