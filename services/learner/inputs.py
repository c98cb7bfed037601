"""The learner's two consumers, positioned by its checkpoint (never by group-managed offsets).

    inputs = Inputs(settings, topics)
    consumer = inputs.open(offsets)                # features + labels.valid, and control apart
    batch = inputs.next_batch(1000, 0.05)          # control first, then up to 1000 stream messages
    marks = inputs.label_ends(offsets)             # [(labels.valid partition, read to its end?)]
    inputs.pause_only({("features", 2)})           # flow control: these partitions wait, the rest are read

Control (retrain.requests, model.swaps) has a consumer of its own: in one consumer, librdkafka's
prefetch queue would put a retrain request behind megabytes of backlog, and the challenger would
come after the stream it should adapt to. Per-partition flow control (pausing a partition that
runs ahead, ordering.FlowControl decides which) is applied here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from ..features.definitions import load_feature_set
from ..shared import kafka
from ..shared.deps import DEPS, backoff_delays
from ..shared.settings import Settings
from ..shared.topics import Topics
from .ordering import INF
from .records import Event

SERVICE = "learner"
log = logging.getLogger(__name__)
UPSTREAM_CHECK_S = 0.5  # the upstream services' committed offsets are asked for at most this often
UPSTREAM_TIMEOUT_S = 2.0  # per broker question about them (the loop waits no longer while it is away)


class Inputs:
    def __init__(self, settings: Settings, topics: Topics) -> None:
        self.settings = settings
        self.topics = topics
        self.consumer: Consumer | None = None
        self.control: Consumer | None = None
        self.label_partitions: list[TopicPartition] = []
        self.feature_partitions: list[TopicPartition] = []
        self.paused: set[tuple[str, int]] = set()
        self.upstream: dict[str, list[tuple[Consumer, list[TopicPartition]]]] = {}
        self.upstream_checked: dict[str, tuple[float, bool]] = {}  # side -> (monotonic time, drained?)
        self.upstream_parts: dict[str, list[TopicPartition]] = {}  # upstream topic -> its partitions
        self.upstream_retry_at: dict[str, float] = {}  # side -> not asked again before (after a failure)
        self.upstream_delays: dict[str, Any] = {}  # side -> its backoff in progress
        self.upstream_failed: dict[str, bool] = {}  # side -> the last question failed (logged once)
        self.rescore_below: dict[tuple[str, int], int] = {}  # features offsets consumed before the lease was taken
        self._keyed: list[str] | None = None  # the features service's internal topics, once known
        self.admin = None  # asks the broker for many partitions' ends at once (made when first needed)

    def open(self, offsets: dict[tuple[str, int], int]) -> Consumer:
        self.label_partitions, self.feature_partitions, self.rescore_below, self.paused = [], [], {}, set()
        self.consumer = self.assign([self.topics.features, self.topics.labels_valid], offsets,
                                    {**kafka.MERGING_CONSUMER, **kafka.batched_fetch(self.settings)})
        self.control = self.assign([self.topics.retrain_requests, self.topics.model_swaps], offsets)
        return self.consumer

    def assign(self, topics: list[str], offsets: dict[tuple[str, int], int], config: dict | None = None) -> Consumer:
        # The group id is the service's (lag tools read its offsets); the position is the checkpoint's.
        c = kafka.consumer(self.settings, self.topics.group(SERVICE), **(config or {}))
        try:
            return self._assign(c, topics, offsets)
        except BaseException:
            c.close()
            raise

    def _assign(self, c: Consumer, topics: list[str], offsets: dict[tuple[str, int], int]) -> Consumer:
        parts = []
        for topic in topics:
            for tp in kafka.partitions_of(self.settings, topic):
                parts.append(TopicPartition(topic, tp.partition, offsets.get((topic, tp.partition), OFFSET_BEGINNING)))
                if topic == self.topics.features:  # events up to here may have been scored before
                    self.rescore_below[(topic, tp.partition)] = c.get_watermark_offsets(tp, timeout=10.0,
                                                                                        cached=False)[1]
                    self.feature_partitions.append(parts[-1])
                elif topic == self.topics.labels_valid:
                    self.label_partitions.append(parts[-1])
        c.assign(parts)
        return c

    def next_batch(self, batch_size: int, timeout: float) -> list[Message]:
        """Control first, then wait at most `timeout` for the first stream message and take what is
        already fetched without waiting (consume() alone would wait out its whole timeout whenever
        fewer than batch_size messages are there: that much latency per batch at live rates)."""
        control = self.control.consume(num_messages=100, timeout=0)
        first = self.consumer.poll(timeout)
        if first is None:
            return control
        return control + [first, *self.consumer.consume(num_messages=batch_size - 1, timeout=0)]

    def partitions(self, side: str) -> list[TopicPartition]:
        """Ours after the services before us on one side: "labels" or "features"."""
        return self.label_partitions if side == "labels" else self.feature_partitions

    def label_ends(self, offsets: dict[tuple[str, int], int]) -> list[tuple[int, bool]]:
        """Each labels.valid partition and whether it is read to its end (the consumer's cached
        watermarks, no broker round trip)."""
        return self.ends(self.label_partitions, offsets, side="labels")

    def feature_ends(self, offsets: dict[tuple[str, int], int], fresh: bool = False,
                     known: dict[tuple[str, int], int] | None = None) -> list[tuple[int, bool]]:
        """Each features partition and whether it is read to its end (`fresh`: ask the broker,
        unless `known` says already)."""
        return self.ends(self.feature_partitions, offsets, fresh, side="features", known=known)

    def ends(self, partitions: list[TopicPartition], offsets: dict[tuple[str, int], int],
             fresh: bool = False, side: str = "", known: dict[tuple[str, int], int] | None = None
             ) -> list[tuple[int, bool]]:
        """A partition we paused is never at its end: it is not idle, we are holding it (and the
        consumer's cached high watermark of it is stale). Nor is one whose end the broker cannot
        tell us now (away). `known`: fresh ends already asked (`drained_ends`)."""
        asked = [tp for tp in partitions if (side, tp.partition) not in self.paused]
        marks = (known if known is not None else self.latest(asked)) if fresh else {}
        out = []
        for tp in partitions:
            if (side, tp.partition) in self.paused:
                out.append((tp.partition, False))
                continue
            try:
                if fresh:
                    low, high = 0, marks.get((tp.topic, tp.partition), -1)
                    if (tp.topic, tp.partition) not in offsets and high >= 0:
                        low = self.consumer.get_watermark_offsets(tp, cached=True)[0]
                else:
                    low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:  # the broker away: not known to be at its end, so not at its end
                log.debug("watermarks of %s unavailable", tp, exc_info=True)
                low, high = 0, -1
            out.append((tp.partition, high >= 0 and offsets.get((tp.topic, tp.partition), max(low, tp.offset)) >= high))
        return out

    def latest(self, partitions: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """(topic, partition) -> its end as the broker says now (`kafka.ends`: one round trip). A
        partition it cannot say now is left out (not known to be at its end)."""
        if not partitions:
            return {}
        try:
            if self.admin is None:
                self.admin = kafka.admin(self.settings)
            return kafka.ends(self.admin, partitions, UPSTREAM_TIMEOUT_S)
        except Exception:  # the broker away: nothing known to be at its end
            log.debug("the ends of %s are unavailable", partitions, exc_info=True)
            return {}

    def pause_only(self, wanted: set[tuple[str, int]]) -> None:
        """Pause exactly these ("features" | "labels", partition); resume the others paused before."""
        if wanted == self.paused:
            return
        by_side = {"features": self.feature_partitions, "labels": self.label_partitions}

        def tps(keys):
            return [TopicPartition(tp.topic, tp.partition) for side, p in keys for tp in by_side[side]
                    if tp.partition == p]

        if self.paused - wanted:
            self.consumer.resume(tps(self.paused - wanted))
        if wanted - self.paused:
            self.consumer.pause(tps(wanted - self.paused))
        log.debug("learner: paused %s", sorted(wanted))
        self.paused = set(wanted)

    def drained_ends(self, side: str = "features", ours: list[TopicPartition] = ()
                     ) -> dict[tuple[str, int], int] | None:
        """Has everything published so far come through the services before us? For "features":
        ingestion has committed to the end of `events` and features to the end of `events.valid`;
        for "labels": ingestion to the end of `labels`. None if not; if so, the ends of `ours` (our
        own partitions after them), asked in the same request as their inputs' ends: after their
        commits, so whatever they wrote before committing is below them. Asked of the broker only
        when the answer matters (a label about to be given up on, an event held back by a
        partition at its end); a "no" is kept for UPSTREAM_CHECK_S, a "yes" never (the next record
        may come right after it). Every commit is read before any end, ingestion's before
        features', so that what ingestion had passed on is then known to be through features too
        or behind its commit (one OffsetFetch per service, then one ListOffsets: the HTTP-only loop
        asks this for every label).

        While the broker is away the answer is "no" without asking (nothing is given up while it
        cannot be asked), and a failed question is asked again only after a backoff with short
        timeouts: the loop never waits long on a broker that is not there. The consumers that read
        the commits are made again after a failure (cheap; a broker restart leaves nothing stale)."""
        now = time.monotonic()
        checked_at, drained = self.upstream_checked.get(side, (-1e9, False))
        if not drained and (now - checked_at < UPSTREAM_CHECK_S or now < self.upstream_retry_at.get(side, 0.0)):
            return None
        if DEPS.is_down("kafka"):
            self.upstream_checked[side] = (now, False)
            return None
        ends = None
        try:
            committed = [tp for c, parts in self.upstream_consumers(side)
                         for tp in c.committed(parts, timeout=UPSTREAM_TIMEOUT_S)]
            asked = [*committed, *ours]
            found = self.latest(asked)
            if len(found) < len(asked):
                raise KafkaException(f"the ends of {sorted(found)} only, of {len(asked)} partitions")
            if not any(found[(tp.topic, tp.partition)] > 0 and tp.offset < found[(tp.topic, tp.partition)]
                       for tp in committed):
                ends = {(tp.topic, tp.partition): found[(tp.topic, tp.partition)] for tp in ours}
        except Exception as exc:  # the broker away: nothing is given up while it cannot be asked
            log.debug("upstream offsets unavailable", exc_info=True)
            delays = self.upstream_delays.setdefault(side, backoff_delays())
            self.upstream_retry_at[side] = time.monotonic() + next(delays)
            self.close_upstream(side)
            if not self.upstream_failed.get(side):
                log.warning("learner: the upstream services' offsets cannot be read (%s); events and labels "
                            "wait until they can", exc.args[0] if exc.args else exc)
            self.upstream_failed[side] = True
        else:
            self.upstream_delays.pop(side, None)
            if self.upstream_failed.pop(side, False):
                log.warning("learner: the upstream services' offsets can be read again")
        self.upstream_checked[side] = (time.monotonic(), ends is not None)
        return ends

    def upstream_floors(self, sides: tuple[str, ...] = ("labels", "features")
                        ) -> dict[tuple[str, int], tuple[int, float, float]] | None:
        """Per partition of ours, ("features" | "labels", partition) -> (offset, lasting, now):
        every record written there from `offset` on has an event time at or after `lasting`, and
        of those already published, at or after `now` (as far as each upstream partition keeps its
        own time order). None when the broker cannot say now.

        Read from the upstream services' commits, whose metadata carries the event time each has
        got to on each input partition (kafka.event_time_metadata), then from the ends of their
        inputs and of ours, in that order. A record not yet through ingestion is at or after
        ingestion's committed event time on its partition; one through ingestion but not through
        features, at or after features'; one through both was acknowledged before those commits
        were read, so it is before our end, read after them. An upstream partition read to its end
        holds nothing back `now` (what it gets next is produced later, so newer: the rule of
        `drained_ends`), and for good only what its own order says. One not read to its end
        and committed without an event time (not yet committed, an older driftline) leaves no floor.

        Ingestion is asked before features, so that what it had passed on is then known to be
        through features or behind its commit. While the broker is away the answer is None
        without asking, and a failed question is asked again only after a backoff. `sides`: only
        the labels' floors when only labels wait (half the round trips)."""
        now = time.monotonic()
        if DEPS.is_down("kafka") or now < self.upstream_retry_at.get("floors", 0.0):
            return None
        try:
            committed: dict[tuple[str, int], TopicPartition] = {}
            for side in ("labels", "features"):  # ingestion before features (see above)
                if side not in sides:
                    continue
                for c, parts in self.upstream_consumers(side):
                    for tp in c.committed(parts, timeout=UPSTREAM_TIMEOUT_S):
                        committed[(tp.topic, tp.partition)] = tp
            if self.admin is None:
                self.admin = kafka.admin(self.settings)
            wanted = [TopicPartition(t, p) for t, p in committed] + [
                TopicPartition(tp.topic, tp.partition) for side in sides for tp in self.partitions(side)]
            ends = kafka.ends(self.admin, wanted, UPSTREAM_TIMEOUT_S)
        except Exception:  # the broker away: no floor now, asked again after a backoff
            log.debug("the upstream services' event times are unavailable", exc_info=True)
            self.upstream_retry_at["floors"] = time.monotonic() + next(
                self.upstream_delays.setdefault("floors", backoff_delays()))
            self.close_upstream("labels")
            self.close_upstream("features")
            self.admin = None
            return None
        self.upstream_delays.pop("floors", None)

        def floor(topics: tuple[str, ...]) -> tuple[float, float]:
            lasting = at_once = INF
            for (topic, partition), tp in committed.items():
                if topic not in topics:
                    continue
                ts = kafka.event_time_of(tp.metadata)
                if max(tp.offset, 0) >= ends[(topic, partition)]:  # read to its end
                    lasting = min(lasting, INF if ts is None else ts)
                else:
                    bound = -INF if ts is None else ts
                    lasting, at_once = min(lasting, bound), min(at_once, bound)
            return lasting, at_once

        out = {}
        if "features" in sides:
            features = floor((self.topics.events, self.topics.events_valid, *self.keyed_topics()))
            out.update({("features", tp.partition): (ends[(tp.topic, tp.partition)], *features)
                        for tp in self.feature_partitions})
        if "labels" in sides:
            labels = floor((self.topics.labels,))
            out.update({("labels", tp.partition): (ends[(tp.topic, tp.partition)], *labels)
                        for tp in self.label_partitions})
        return out

    def upstream_consumers(self, side: str) -> list[tuple[Consumer, list[TopicPartition]]]:
        """Per service before us, a consumer in its group (never subscribes: reads commits) and its
        input partitions (asked of the broker once)."""
        if side not in self.upstream:
            hops = ((("ingestion", self.topics.events), ("features", self.topics.events_valid),
                     *(("features", t) for t in self.keyed_topics())) if side == "features"
                    else (("ingestion", self.topics.labels),))
            for _, topic in hops:
                if topic not in self.upstream_parts:
                    self.upstream_parts[topic] = [TopicPartition(topic, tp.partition)
                                                  for tp in kafka.partitions_of(self.settings, topic,
                                                                                timeout=UPSTREAM_TIMEOUT_S)]
            self.upstream[side] = [(kafka.consumer(self.settings, self.topics.group(service)),
                                    self.upstream_parts[topic]) for service, topic in hops]
        return self.upstream[side]

    def keyed_topics(self) -> list[str]:
        """The features service's internal topics (aggregates keyed by another field: events on
        their way to a key field's stage, then to the vectors' stage), in the stages' order, asked
        after events.valid: what each stage passed on is then known to be through the next or
        behind its commits."""
        if self._keyed is None:
            try:
                stages = load_feature_set(self.settings.features.set).stages
            except ValueError:  # the features service says what is wrong with it
                stages = ()
            n = len(kafka.partitions_of(self.settings, self.topics.events_valid, timeout=UPSTREAM_TIMEOUT_S)) if stages else 0
            self._keyed = self.topics.internal(stages, n)
        return self._keyed

    def close_upstream(self, side: str) -> None:
        for c, _ in self.upstream.pop(side, ()):
            kafka.close_quietly(c)

    def maybe_scored(self, event: Event) -> bool:
        """Read before the lease was taken? Then a prediction stored for it (made at event time) is kept."""
        return event.offset < self.rescore_below.get((event.topic, event.partition), 0)

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """For lag tools only (kafka-consumer-groups, the replay's stall report): never read back."""
        self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True)

    def close_all(self) -> None:
        """Every consumer opened since the lease was taken (a start given up half-way: the broker away)."""
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception:  # never joined a group: nothing to lose
                log.debug("closing the main consumer failed", exc_info=True)
        self.consumer = None
        self.close_control()

    def close_control(self) -> None:
        if self.control is not None:
            self.control.close()
        self.control = None
        for side in list(self.upstream):
            self.close_upstream(side)
