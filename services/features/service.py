"""The features service: events.valid + labels.valid -> entity state in Redis -> `features`.

For each event it computes the feature vector from its entity's state *before* the event, keeps
that vector in Redis under the event id (with a TTL, for the label's join), publishes it to
`features` (key entity_id), and folds the event into the state. A label updates its entity's last
known label. It must never let a label reach a vector of an event that came before the label, nor
fold the same event into a state twice.

    driftline serve features            # port settings.ports.features: /health, /metrics

How a batch goes (`FeaturesWorker.handle`):
1. decode; bad bytes go to events.dlq / labels.dlq with the reason (nothing crashes the loop);
2. `ReorderBuffer` (reorder.py): events and labels are merged by event time. A label with ts <= an
   event's ts is applied before that event's vector; each side waits for the other's partitions to
   pass its time, but at most `max_reorder_wait_ms` once they hold nothing unread (a backlog is
   read, not skipped), and an event no longer once no label is on its way through ingestion
   (`let_go_what_nothing_holds`); each partition stays in offset order; a partition far ahead is
   paused meanwhile. A feature set without `last_label` does not read labels.valid and waits for nothing;
3. one pipelined Redis read: the states of the batch's entities and the snapshots of the events
   that the batch's labels refer to (when the event is not in the batch itself);
4. in Python, in merged order: vector from the state, then `apply_event`; labels `apply_label`;
5. one pipelined Redis write: snapshots (with TTL), then each entity's state with its last applied
   offset (one script call for the batch's states, atomic per key; keys are hash-tagged per
   entity, so cluster-ready: one call per slot there), then the labels through a script that keeps
   the label of the latest event;
6. produce the vectors, flush, commit the offsets up to the first item still waiting.

Bounds (untrusted input must not grow Redis or the model without end): an event that would bring
the model more than `features.max_feature_names` distinct field names, or its entity more than
`features.max_entity_fields`, or a text (categorical) field more than `features.max_categories`
distinct values, goes to events.dlq (`too_many_feature_names`, `too_many_entity_fields`,
`too_many_categories`) instead; entity states expire after `features.entity_ttl_s` idle.

Idempotence: an event at an offset <= its entity's `_off` was applied before a crash; it is not
applied again, its vector is re-published from its snapshot. Labels are idempotent by design.

Aggregates keyed by another field (a merchant; keyed.py, docs/features.md): no event is published
here. Its own entity's features go with it, in merge order, to the stage of the first key field
(`Forwarder`); each key field's stage (`KeyStage`, in the worker that owns that key partition)
adds its aggregates, if the event names such an entity, and sends it on; the vectors' stage, back
on the event's own partition, publishes it in the stream's order. Step 5
then waits for the broker to acknowledge what was sent on before it writes the states that say
the events were folded, and keeps each partition's merge time (`features:order`) with them.

The feature set comes from `settings.features.set`: `default`, `raw` or a TOML/YAML file with the
keys of `definitions.FeatureSpec` (each documented there, once; `example.toml` next to this file
shows them all).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from ..shared import deps, kafka, metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.deadletter import dead_letter
from ..shared.keys import Keys
from ..shared.app import service_app
from ..shared.loop import RestartLoop, StreamWorker
from ..shared.process import run_app
from ..shared.settings import Settings
from ..shared.upstream import UpstreamDrained
from .cache import StateCache
from .definitions import ENTITY_KEY, FeatureSet, load_feature_set
from .keyed import HANDLING, Forwarder, KeyStage
from .reorder import BAD, EVENT, LABEL, Item, ReorderBuffer
from .store import OFFSET_FIELD, PARTITION_FIELD, BatchRead, Categories, FeatureStore, FieldNames
from .windows import IN_ORDER

__all__ = ["SERVICE", "BAD", "EVENT", "LABEL", "Item", "ReorderBuffer", "FeaturesWorker", "serve"]

log = logging.getLogger(__name__)
SERVICE = "features"
# An event waiting for older labels asks whether any is on its way after this long (and then at
# most this often): a few ms of broker round trips, against max_reorder_wait_ms.
LABELS_CHECK_S = 0.02


class FeaturesWorker(StreamWorker):
    service = SERVICE

    def __init__(self, settings: Settings, feature_set: FeatureSet | None = None) -> None:
        super().__init__(settings)
        self.batch_size = settings.features.batch_size
        self.commit_interval_s = settings.features.commit_interval_s
        self.codec = get_codec()
        self.feature_set = feature_set or load_feature_set(settings.features.set)
        self.redis = deps.redis_client(settings)  # waits out a Redis outage
        self.keys = Keys(settings.namespace)
        self.store = FeatureStore(self.redis, self.keys, self.feature_set,
                                  settings.features.snapshot_ttl_s, service=SERVICE,
                                  entity_ttl_s=settings.features.entity_ttl_s)
        self.names = FieldNames(self.redis, self.keys, settings.learner.model_name,
                                settings.features.max_feature_names)
        self.categories = Categories(self.redis, self.keys, settings.learner.model_name,
                                     settings.features.max_categories)
        self.max_entity_fields = settings.features.max_entity_fields
        # A feature set without the last label has nothing to wait for: events go at once.
        wait_s = settings.features.max_reorder_wait_ms / 1000.0 if self.feature_set.spec.last_label else 0.0
        self.buffer = ReorderBuffer(wait_s=wait_s, cap=max(20 * self.batch_size, 1000),
                                    align_events=bool(self.feature_set.keys))
        self.entities = StateCache(settings.features.cache_entities)  # this worker's entities, decoded
        self.late_own = {outcome: metrics.LATE_EVENTS.labels(ENTITY_KEY, handling)
                         for outcome, handling in HANDLING.items()}
        # Key fields' stages (keyed.py): made when the loop starts (they need events.valid's partitions).
        self.forward: Forwarder | None = None  # to the first key field's stage
        self.stages: list[KeyStage] = []
        self.stage_of: dict[str, KeyStage] = {}  # internal topic -> its stage
        self.order: dict[int, float] = {}  # events.valid partition -> its latest event time (the merge time)
        self._positions: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self._highs: dict[tuple[str, int], int] = {}  # the broker's high watermark, as last known
        self._committed: dict[tuple[str, int], int] = {}
        self._paused: set[tuple[str, int]] = set()
        self._assigned: list[tuple[str, int]] = []
        # A partition with this many items waiting is paused, so that the consumer fetches the
        # other stream instead of buffering one (librdkafka hands out a partition in big chunks).
        self.max_waiting_per_partition = self.batch_size
        self.counts = {"events": 0, "labels": 0, "redelivered": 0, "labels_unmatched": 0, "dead_letters": 0,
                       "rebuilds": 0, "duplicates": 0, "late_events": 0, "forwarded": 0}
        self.applied_key = self.keys.features_applied()
        self.order_key = self.keys.features_order()
        self._applied_local: dict[tuple[str, int], int] = {}  # the applied offsets this worker wrote last
        # Has ingestion passed on all that was published to `events` / `labels`? (shared/upstream.py)
        self.ingestion_drained = UpstreamDrained(settings, self.topics.group("ingestion"), self.topics.events)
        self.labels_drained = UpstreamDrained(settings, self.topics.group("ingestion"), self.topics.labels)
        self.other_checked_at = -math.inf

    # -- the key fields' stages ----------------------------------------------------------------
    def build_stages(self) -> None:
        """One stage per key field, in the feature set's order, each forwarding to the next; their
        internal topics are made here (as many partitions as events.valid). A broker away: the loop
        starts over (and asks again)."""
        fs = self.feature_set
        if not fs.keys or self.stages:
            return
        stages = fs.stages
        try:
            partitions = len(kafka.partitions_of(self.settings, self.topics.events_valid))
            outputs = len(kafka.partitions_of(self.settings, self.topics.features))
            kafka.ensure_internal_topics(self.settings, self.topics.internal(stages, partitions), partitions)
        except (KafkaException, TimeoutError) as exc:  # the broker away or slow: asked again
            raise RestartLoop(f"could not make the key fields' internal topics: {exc}") from exc
        if outputs != partitions:
            # The vectors' stage publishes to its events.valid partition's number (the entity's
            # partition: both topics are keyed by it): as many are needed.
            raise RestartLoop(f"features has {outputs} partitions and events.valid {partitions}: aggregates "
                              f"keyed by another field need as many (one writer per features partition)")
        hold_s = self.settings.features.keyed_hold_ms / 1000.0
        idle_wait_s = self.settings.features.max_reorder_wait_ms / 1000.0
        forwards = [Forwarder(self.producer, self.codec, self.topics, key, partitions, SERVICE) for key in stages]
        self.forward = forwards[0]
        for i, key in enumerate(stages):
            stage = KeyStage(feature_set=fs, key=key, store=self.store, topics=self.topics, codec=self.codec,
                             partitions=partitions, produce=self.produce, flush=self._flush_forwards,
                             forward=forwards[i + 1] if i + 1 < len(forwards) else None,
                             idle_wait_s=idle_wait_s, hold_s=hold_s,
                             cache_entities=self.settings.features.cache_entities,
                             queue_limit=self.batch_size, service=SERVICE)
            self.stages.append(stage)
            self.stage_of.update({t: stage for t in stage.topics_read()})

    def _flush_forwards(self) -> None:
        """Events sent on must be acknowledged before the states that say they were folded are
        written (a crash in between sends them again; the next stage's guards skip them)."""
        if not self.commits.flush_until_stopped():
            raise RestartLoop("stopping while the broker has not acknowledged what was sent on")

    def input_topics(self) -> list[str]:
        topics = [self.topics.events_valid]
        if self.feature_set.spec.last_label:
            topics.append(self.topics.labels_valid)
        return topics + [t for stage in self.stages for t in stage.topics_read()]

    def open_consumer(self) -> Consumer:
        self.build_stages()
        self.forget_states()
        self.forget_forwards()
        # range: a member gets the same partitions of every topic with as many (events.valid k and
        # partition k of every internal topic), which makes it the one owner of key partition k.
        c = kafka.consumer(self.settings, self.topics.group(self.service), **{
            **kafka.MERGING_CONSUMER, **kafka.batched_fetch(self.settings), "partition.assignment.strategy": "range"})
        c.subscribe(self.input_topics(), on_assign=self._on_assign, on_revoke=self._on_revoke)
        return c

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.rewind_to_applied(consumer, partitions)
        self._assigned.extend((p.topic, p.partition) for p in partitions)
        if self.stages:
            owned = {(p.topic, p.partition) for p in partitions}
            for stage in self.stages:
                for k in {k for t, k in owned if t in stage.source_of}:
                    missing = [t for t in stage.topic_of if (t, k) not in owned]
                    if missing:
                        log.error("key partition %d of %s: this worker was given some of its sources, not %s "
                                  "(the group's members must all read the same topics, range-assigned)",
                                  k, stage.key, missing[:3])

    def applied_offsets(self) -> dict[tuple[str, int], int]:
        raw = self.redis.hgetall(self.applied_key)
        out = {}
        for field_, value in raw.items():
            topic, _, partition = field_.decode().rpartition("/")
            out[(topic, int(partition))] = int(value)
        return out

    def rewind_to_applied(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start a partition at Redis' applied offset when that is behind the committed one: Redis
        lost writes that Kafka's offsets say were made (a crash of Redis that lost its last
        writes: see the README's "What a Redis crash may lose"). Re-reading those records rebuilds
        the entity states: an event already folded in (offset <= its entity's `_off`) is skipped.
        A partition Redis has no offset for (a new one, or before this check existed) starts at
        the committed offset as usual."""
        try:
            applied = self.applied_offsets()
            committed = consumer.committed(partitions, timeout=10)
        except (KafkaException, redis.RedisError):
            log.warning("could not compare Redis' applied offsets with Kafka's committed ones", exc_info=True)
            return
        rewound = False
        for tp, c in zip(partitions, committed):
            done = applied.get((tp.topic, tp.partition))
            if done is not None and c.offset >= 0 and done < c.offset:
                log.error("features state in Redis is behind Kafka on %s/%d (applied up to %d, committed %d): "
                          "re-reading %d records to rebuild it", tp.topic, tp.partition, done, c.offset,
                          c.offset - done)
                tp.offset = done
                self.counts["rebuilds"] += 1
                rewound = True
        if rewound:
            consumer.assign(partitions)

    def verify_applied(self, tps) -> None:
        """Before a batch touches Redis: are the applied offsets still those this worker wrote
        last? Lower = Redis restarted without its last writes; folding events into its older
        states would make wrong ones. Start the loop over instead: the new assignment re-reads
        from the applied offsets (rewind_to_applied), nothing of this batch was written."""
        tps = sorted(tp for tp in set(tps) if tp in self._applied_local)
        if not tps:
            return
        stored = self.redis.hmget(self.applied_key, [f"{t}/{p}" for t, p in tps])
        behind = [tp for tp, v in zip(tps, stored) if v is None or int(v) < self._applied_local[tp]]
        if behind:
            self._applied_local.clear()
            raise RestartLoop(f"Redis lost writes this worker made (applied offset of {behind[0]} went back): "
                              "rebuilding the entity states from Kafka")

    def expect_assigned(self) -> None:
        """Tell the merges which new partitions still hold data (asked once per assignment); give
        the key fields' stages their partitions, and each events.valid partition its merge time."""
        if not self._assigned or self.consumer is None:
            return
        tps, self._assigned = self._assigned, []
        now = time.monotonic()
        for stage in self.stages:
            stage.assigned(tps, now)
        if self.forward is not None:
            self.restore_order([p for t, p in tps if t == self.topics.events_valid])
        try:
            committed = self.consumer.committed([TopicPartition(*tp) for tp in tps], timeout=10)
            for tp in committed:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=5)
                start = tp.offset if tp.offset >= 0 else low
                self._positions.setdefault((tp.topic, tp.partition), start)
                self._highs[(tp.topic, tp.partition)] = high
                if start < high and tp.topic in (self.topics.events_valid, self.topics.labels_valid):
                    kind = EVENT if tp.topic == self.topics.events_valid else LABEL
                    self.buffer.expect((tp.topic, tp.partition), kind)
        except KafkaException:  # best effort: without it, the bounded wait still applies
            log.warning("could not read the new partitions' offsets", exc_info=True)

    def restore_order(self, partitions: list[int]) -> None:
        """The merge time each events.valid partition had got to at its applied offset (written
        with it), so that what is sent on from a new owner goes on from there."""
        if not partitions:
            return
        stored = self.redis.hmget(self.order_key, [f"{self.topics.events_valid}/{p}" for p in partitions])
        for p, value in zip(partitions, stored):
            if value is not None:
                self.order[p] = max(self.order.get(p, -math.inf), float(value))

    def forget_states(self) -> None:
        """Whatever this worker held of its entities' states, and what its key fields' stages held
        waiting: it may no longer be their only writer (its partitions moved, its loop starts over
        after Redis lost writes); what waited is read again from the committed offsets."""
        self.entities.clear()
        for stage in self.stages:
            stage.cache.clear()
            stage.merges.clear()

    def forget_forwards(self) -> None:
        """What was queued for the next stages and what they were told: after a rebalance or a
        start over, the partitions' next owners hear every watermark again, and events of a batch
        given up are sent again when it is read again."""
        for forward in [self.forward] + [s.forward for s in self.stages]:
            if forward is not None:
                forward.forget()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.settle_on_revoke(consumer, partitions)  # commit what was handled while the partitions are ours
        tps = [(p.topic, p.partition) for p in partitions]
        self.forget_states()
        self.buffer.drop(tps)
        self.forget_forwards()
        paused = [TopicPartition(*tp) for tp in tps if tp in self._paused]
        if paused:  # a pause outlives a rebalance in librdkafka; never hand one on
            consumer.resume(paused)
        for tp in tps:
            self._committed.pop(tp, None)
            self._applied_local.pop(tp, None)
            self._paused.discard(tp)
            self._positions.pop(tp, None)
            self._highs.pop(tp, None)
            if tp[0] == self.topics.events_valid:
                self.order.pop(tp[1], None)

    def queued(self, tp: tuple[str, int]) -> int:
        stage = self.stage_of.get(tp[0])
        if stage is not None:
            merge = stage.merges.get(tp[1])
            return merge.queued(stage.source_of[tp[0]]) if merge is not None else 0
        return len(self.buffer.queues.get(tp, ()))

    def flow_control(self) -> None:
        """Pause partitions whose items wait (for the other stream, or at a key field's stage for
        the other sources); resume them once drained. On resume, librdkafka fetches again from the
        last message it handed us."""
        assert self.consumer is not None
        limit = self.max_waiting_per_partition
        crowded = [tp for tp, q in self.buffer.queues.items() if len(q) > limit]
        for stage in self.stages:
            crowded += stage.crowded()
        pause = [tp for tp in crowded if tp not in self._paused]
        resume = [tp for tp in self._paused if self.queued(tp) <= limit // 2]
        if pause:
            self.consumer.pause([TopicPartition(*tp) for tp in pause])
            self._paused.update(pause)
        if resume:
            self.consumer.resume([TopicPartition(*tp) for tp in resume])
            self._paused.difference_update(resume)

    # -- the loop: consume -> decode -> merge -> read, compute, write -> produce -> commit -----
    def handle(self, messages: list[Message]) -> None:
        self.expect_assigned()
        with _stage("decode"):
            now = time.monotonic()
            for m in messages:
                topic = m.topic()
                self._positions[(topic, m.partition())] = m.offset() + 1
                stage = self.stage_of.get(topic)
                if stage is None:
                    self.buffer.add(self.decode(m, now))
                elif not stage.take(topic, m.partition(), m.offset(), m.value(), now):
                    metrics.DEAD_LETTERS.labels(SERVICE, kafka.base_topic(topic), "not_avro").inc()
        self.process(self.buffer.pop_ready(time.monotonic(), self.lagging()))
        self.run_stages()
        self.flow_control()

    def tick(self) -> None:
        """Between batches: let items go whose wait is over, tell the next stages how far this
        worker has got; what was handled is flushed and committed by the loop."""
        self.expect_assigned()
        handled = False
        if self.buffer.pending:
            lagging = self.lagging()
            self.let_go_what_nothing_holds(lagging)
            items = self.buffer.pop_ready(time.monotonic(), lagging)
            if items:
                self.process(items)
                handled = True
        handled = self.run_stages() or handled
        self.send_watermarks()
        if handled and self.unsettled_since is None:
            self.unsettled_since = time.monotonic()  # the loop settles it (flush, commit) when due
        if self.consumer is not None:
            self.flow_control()

    @property
    def poll_timeout_s(self) -> float:
        """While items wait, the loop comes back often enough to let them go when they may."""
        return LABELS_CHECK_S if self.buffer.pending else StreamWorker.poll_timeout_s

    def let_go_what_nothing_holds(self, lagging: set[tuple[str, int]]) -> None:
        """Events that wait for older labels while no label is on its way: labels.valid's
        partitions here are read to their ends by the broker's count now, and ingestion has passed
        on all that was published to `labels`. Nothing older can come through driftline then, and
        waiting out `max_reorder_wait_ms` would only add latency to every event of a stream whose
        labels are rare. Asked at most every LABELS_CHECK_S, and of the broker only once an
        event has waited that long and the consumer knows of nothing unread on labels.valid.

        A label still in its producer's buffer, or being written by ingestion's HTTP door, then
        reaches the events after it as a late label would: their vectors carry the label before
        it. Labels that wait for events are not let go this way: a label that overtook its event
        in a producer would reach that event's own vector."""
        now = time.monotonic()
        if now - self.other_checked_at < LABELS_CHECK_S:
            return
        waiting = self.buffer.waiting_for(now, LABELS_CHECK_S)
        if waiting is None or waiting[0] != LABEL:
            return
        self.other_checked_at = now
        ours = [tp for tp in self._positions if tp[0] == self.topics.labels_valid]
        if lagging.intersection(ours):
            return
        ends = self.labels_drained.ends_if_drained(TopicPartition(*tp) for tp in ours)
        if ends is not None and all(ends.get(tp, math.inf) <= self._positions[tp] for tp in ours):
            self.buffer.caught_up(LABEL, waiting[1])

    def run_stages(self) -> bool:
        """Each key field's stage lets go what its merges allow (after this batch's events were sent
        on to the first one). True if anything was handled."""
        if not self.stages:
            return False
        lagging = self.lagging()
        self.verify_applied(tp for stage in self.stages for tp in self._applied_local if tp[0] in stage.source_of)
        handled = False
        for stage in self.stages:
            applied = stage.process(time.monotonic(), lagging)
            if applied:
                self._applied_local.update(applied)
                handled = True
        self.send_watermarks()
        return handled

    def send_watermarks(self) -> None:
        """How far each source of ours has got, to the partitions of the next stage that have not
        heard it (keyed.Forwarder; rate-limited there). An events.valid partition has got to its
        merge time, or to the time of its first event still waiting here; it is idle when nothing
        of it waits and nothing is left to read."""
        if self.forward is None or self.consumer is None:
            return
        now = time.monotonic()
        lagging = self.lagging()
        marks = {}
        for (topic, p) in self._positions:
            if topic != self.topics.events_valid:
                continue
            q = self.buffer.queues.get((topic, p))
            mark = self.order.get(p, -math.inf)
            if q and q[0].kind == EVENT:
                mark = max(mark, q[0].ts)
            marks[p] = (mark, not q and (topic, p) not in lagging)
        # An events.valid partition at its end is idle only once ingestion has nothing in flight
        # either: behind a loaded ingestion, an earlier event of that partition may still come.
        if any(idle for _, idle in marks.values()) and not self.ingestion_drained():
            marks = {p: (mark, False) for p, (mark, _) in marks.items()}
        self.forward.watermarks(now, marks)
        for stage in self.stages:
            if stage.forward is not None:
                stage.forward.watermarks(now, stage.marks(now, lagging))

    def lagging(self) -> set[tuple[str, int]]:
        """Partitions with unread data in the broker (librdkafka's cached high watermarks: no
        round trip). Items that wait for them do not give up waiting: their data is coming."""
        assert self.consumer is not None
        out = set()
        for tp, pos in self._positions.items():
            try:
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
            except KafkaException:
                high = None
            if high is not None and high > self._highs.get(tp, -1):
                self._highs[tp] = high
            if pos < self._highs.get(tp, -1):
                out.add(tp)
        return out

    def commit(self) -> None:
        """Commit up to the first item still waiting, with the event time from there on in the
        commit's metadata (the learner's watermark of what is still on its way)."""
        assert self.consumer is not None
        wanted = [(tp, o, self.buffer.event_time_at_commit(tp)) for tp, o in self.buffer.commit_offsets().items()]
        for stage in self.stages:
            wanted += stage.commit_offsets()
        offsets = []
        for (t, p), o, ts in wanted:
            if self._committed.get((t, p)) != o:
                offsets.append(TopicPartition(t, p, o) if ts is None else
                               TopicPartition(t, p, o, metadata=kafka.event_time_metadata(ts)))
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            for tp in offsets:
                self._committed[(tp.topic, tp.partition)] = tp.offset

    def decode(self, m: Message, now: float) -> Item:
        is_event = m.topic() == self.topics.events_valid
        try:
            value = self.codec.decode(m.value(), expect="Event" if is_event else "Label")
        except DecodeError as exc:
            return Item(BAD, 0.0, m.topic(), m.partition(), m.offset(), m, now, reason=exc.reason)
        return Item(EVENT if is_event else LABEL, value["ts"], m.topic(), m.partition(), m.offset(), value, now)

    def bound_fields(self, items: list[Item]) -> list[Item]:
        """Events whose field names the model may not take (more than features.max_feature_names
        distinct ones) become BAD items with that reason: dead-lettered, never folded in."""
        # Ordered as the stream (dicts, not sets): the first names and values to come are the ones kept.
        names = dict.fromkeys(name for i in items if i.kind == EVENT for name in i.value["fields"])
        refused = self.names.admit(names) if names else set()
        if refused:
            for item in items:
                if item.kind == EVENT and not refused.isdisjoint(item.value["fields"]):
                    self.refuse(item, "too_many_feature_names",
                                f"the model already has {self.names.limit} distinct field names "
                                f"(features.max_feature_names); new: {sorted(refused & set(item.value['fields']))[:5]}")
        texts: dict[str, dict[str, None]] = {}
        keys = self.feature_set.keys  # key fields name entities: identifiers, not categories of the model
        for item in items:
            if item.kind == EVENT:
                for name, value in item.value["fields"].items():
                    if isinstance(value, str) and name not in keys:
                        texts.setdefault(name, {})[value] = None
        refused_texts = self.categories.admit(texts) if texts else set()
        if refused_texts:
            for item in items:
                if item.kind == EVENT:
                    new = sorted(f"{n}={v}" for n, v in item.value["fields"].items() if (n, v) in refused_texts)
                    if new:
                        self.refuse(item, "too_many_categories",
                                    f"a field already took {self.categories.limit} distinct text values "
                                    f"(features.max_categories); new: {new[:5]}")
        return items

    def refuse(self, item: Item, reason: str, detail: str) -> None:
        item.kind, item.reason, item.detail = BAD, reason, detail

    def process(self, items: list[Item]) -> None:
        if not items:
            return
        self.verify_applied(i.tp for i in items)
        fs = self.feature_set
        items = self.bound_fields(items)
        events = [i.value for i in items if i.kind == EVENT]
        in_batch = {e["event_id"]: (e["entity_id"], e["ts"]) for e in events}
        wanted = [i.value["event_id"] for i in items if i.kind == LABEL and i.value["event_id"] not in in_batch]
        keyed = self.forward is not None
        with _stage("read"):
            states, read = self.read_states([e["entity_id"] for e in events] if fs.stateful else [],
                                            wanted if fs.spec.last_label else (), [e["event_id"] for e in events])
            snapshots, folded = read.snapshots, read.folded
        with _stage("compute"):
            vectors, snapshot_blobs, dirty, redelivered = [], [], set(), []
            labels: dict[str, tuple[str, float]] = {}  # entity -> its latest label in the batch
            order, moved = self.order, set()
            for item in items:
                if keyed and item.topic == self.topics.events_valid and isinstance(item.value, dict):
                    p = item.partition  # the merge time: the partition's latest event time so far
                    if item.value["ts"] > order.get(p, -math.inf):
                        order[p] = item.value["ts"]
                    moved.add(p)
                if item.kind == EVENT:
                    ev = item.value
                    marker = f"{item.partition}:{item.offset}"
                    if folded.setdefault(ev["event_id"], marker) != marker:
                        # A copy of an event folded already from another input (store.FOLDED_FIELD)
                        self.counts["duplicates"] += 1
                        metrics.DUPLICATES.labels(SERVICE, "events.valid").inc()
                        continue
                    state = states.get(ev["entity_id"], {})
                    if _applied(state, item):
                        # One sent on was acknowledged before its state was written: the stages
                        # after this one have it. One published here is published again.
                        if not keyed:
                            redelivered.append(ev["event_id"])
                        continue
                    new = fs.untracked(state, ev["fields"]) if fs.stateful else ()
                    if new and len(fs.tracked(state)) + len(new) > self.max_entity_fields:
                        self.refuse(item, "too_many_entity_fields",
                                    f"entity {ev['entity_id'][:40]!r} would track more than "
                                    f"{self.max_entity_fields} distinct fields (features.max_entity_fields)")
                        in_batch.pop(ev["event_id"], None)  # its label must not reach the state either
                        continue
                    if keyed:
                        # Its vector is completed (and kept) by the stages after this one; one that
                        # names no key entity goes through them too, to keep its place in the
                        # stream's order on `features` (the vectors' stage publishes).
                        self.send_on(item, fs.own_features(state, ev["fields"], ev["ts"]), fs.key_values(ev["fields"]))
                        snapshot_blobs.append((ev["event_id"], b"", marker))
                    else:
                        fv = self.vector_of(ev, fs.vector(state, ev["fields"], ev["ts"]))
                        blob = self.codec.encode("FeatureVector", fv)
                        vectors.append((fv, blob))
                        snapshot_blobs.append((ev["event_id"], blob, marker))
                    if fs.stateful:
                        self.count_late(fs.apply_event(state, ev["fields"], ev["ts"]))
                        state[OFFSET_FIELD], state[PARTITION_FIELD] = item.offset, item.partition
                        dirty.add(ev["entity_id"])
                elif item.kind == LABEL and fs.spec.last_label:  # else labels change nothing here
                    where = self.locate(item.value["event_id"], in_batch, snapshots)
                    if where is None:
                        self.counts["labels_unmatched"] += 1  # the learner dead-letters it
                        continue
                    entity_id, event_ts = where
                    if entity_id in states:
                        fs.apply_label(states[entity_id], item.value["label"], event_ts)
                    if entity_id not in labels or event_ts >= labels[entity_id][1]:
                        labels[entity_id] = (item.value["label"], event_ts)
                    self.counts["labels"] += 1
        with _stage("write"):
            if keyed and len(snapshot_blobs) > len(vectors):
                self.forward.flush()
                self._flush_forwards()
            pipe = self.redis.pipeline(transaction=False)
            # snapshots before states: a state's `_off` then implies its events' snapshots exist
            self.store.queue_snapshot_blobs(pipe, snapshot_blobs)
            self.store.queue_states(pipe, {e: states[e] for e in dirty})
            self.store.queue_labels(pipe, labels)
            if moved:
                pipe.hset(self.order_key, mapping={f"{self.topics.events_valid}/{p}": repr(order[p]) for p in moved})
            # Last: how far this batch's effects go (the AOF keeps a prefix of the writes).
            applied = {i.tp: i.offset + 1 for i in items}
            self.store.queue_applied(pipe, applied)
            self.store.execute(pipe, "write_batch")
            self._applied_local.update(applied)
        blobs = [blob for _fv, blob in vectors]
        vectors = [fv for fv, _blob in vectors]
        if redelivered:
            recovered = self.recover(redelivered)
            vectors += recovered
            blobs += [self.codec.encode("FeatureVector", fv) for fv in recovered]
        with _stage("produce"):
            for fv, blob in zip(vectors, blobs):
                self.produce(self.topics.features, blob, key=fv["entity_id"])
            for item in items:
                if item.kind == BAD:
                    self.dead_letter(item)
        self.counts["events"] += len(events)

    def read_states(self, entity_ids: list[str], snapshots_of, folded_of: list[str]) -> tuple[dict[str, dict], BatchRead]:
        """The states of these entities: those this worker holds (cache.py; only their label fields,
        which any replica may write, are read), the others from Redis; and, in the same round
        trip, the snapshots of `snapshots_of` and the fold markers of `folded_of`."""
        states, missing = {}, []
        for entity_id in dict.fromkeys(entity_ids):
            state = self.entities.get(entity_id)
            if state is None:
                missing.append(entity_id)
            else:
                states[entity_id] = state
        read = self.store.read_batch(missing, snapshots_of, folded_of=folded_of,
                                     labels_of=states if self.feature_set.spec.last_label else ())
        for entity_id, (label, label_ts) in read.labels.items():
            state = states[entity_id]
            for name, value in (("label", label), ("label_ts", label_ts)):
                if value is None:
                    state.pop(name, None)
                else:
                    state[name] = value
        for entity_id, state in read.states.items():
            states[entity_id] = state
            self.entities.put(entity_id, state)
        return states, read

    def send_on(self, item: Item, own: dict[str, float], names: dict[str, str]) -> None:
        """An event goes to the first key field's stage (to the partition of the key entity it
        names there, else of its own), with its own entity's features and its merge order: (the
        partition's merge time, partition, offset)."""
        ev = item.value
        p = item.partition
        payload = {"event_id": ev["event_id"], "entity_id": ev["entity_id"], "ts": ev["ts"], "fields": ev["fields"],
                   "published_ms": ev.get("published_ms"), "features": own}
        self.forward.send(p, (self.order[p], p, item.offset), payload, names.get(self.forward.key, ev["entity_id"]), [])
        self.counts["forwarded"] += 1

    def count_late(self, outcome: int) -> None:
        if outcome != IN_ORDER:
            self.counts["late_events"] += 1
            self.late_own[outcome].inc()

    def vector_of(self, ev: dict, features: dict[str, float]) -> dict:
        return {"event_id": ev["event_id"], "entity_id": ev["entity_id"], "ts": ev["ts"], "features": features,
                "feature_set": self.feature_set.name, "published_ms": ev.get("published_ms")}

    @staticmethod
    def locate(event_id: str, in_batch: dict, snapshots: dict) -> tuple[str, float] | None:
        """The entity and event time a label belongs to: from this batch, else the snapshot."""
        if event_id in in_batch:
            return in_batch[event_id]
        fv = snapshots.get(event_id)
        return (fv["entity_id"], fv["ts"]) if fv else None

    def recover(self, event_ids: list[str]) -> list[dict]:
        """Vectors of events applied before a crash: re-published exactly as first computed."""
        self.counts["redelivered"] += len(event_ids)
        found = self.store.read_snapshots(event_ids)
        missing = len(event_ids) - len(found)
        if missing:  # expired: the state moved on, so an exact vector can no longer be made
            log.warning("%d redelivered events have no snapshot left; not re-published", missing)
        return [found[e] for e in event_ids if e in found]

    def dead_letter(self, item: Item) -> None:
        if isinstance(item.value, dict):  # a decoded event refused by a bound: its record is the payload
            key, payload = item.value["entity_id"].encode(), self.codec.encode("Event", item.value)
        else:
            m: Message = item.value
            key, payload = m.key(), m.value() or b""
        dlq = self.topics.events_dlq if item.topic == self.topics.events_valid else self.topics.labels_dlq
        self.produce(dlq, dead_letter(item.topic, item.reason, item.detail or f"not a valid record on {item.topic}",
                                      SERVICE, key, payload, item.partition, item.offset), key=key)
        metrics.DEAD_LETTERS.labels(SERVICE, kafka.base_topic(item.topic), item.reason).inc()
        self.counts["dead_letters"] += 1

    def health(self) -> dict[str, Any]:
        keyed = {}
        for stage in self.stages:
            for name, n in stage.counts.items():
                keyed[name] = keyed.get(name, 0) + n
        return {**super().health(), "feature_set": self.feature_set.name, "waiting": self.buffer.pending,
                "keyed_waiting": sum(s.waiting() for s in self.stages), **self.counts, **keyed}

    def close(self) -> None:
        self.ingestion_drained.close()
        self.labels_drained.close()
        self.redis.close()


def _applied(state: dict, item: Item) -> bool:
    """Was this event already folded into the state (a redelivery after a crash)?"""
    return state.get(PARTITION_FIELD) == item.partition and state.get(OFFSET_FIELD, -1) >= item.offset


class _stage:
    """Times one stage of a batch into driftline_processing_seconds{service="features",stage}."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *_exc) -> None:
        metrics.PROCESSING_SECONDS.labels(SERVICE, self.name).observe(time.perf_counter() - self.started)


def serve(settings: Settings) -> None:
    """`driftline serve features`: the worker loop plus /health and /metrics."""
    worker = FeaturesWorker(settings)
    run_app(service_app(SERVICE, worker=worker, title="driftline features"), settings.ports.features, settings)
