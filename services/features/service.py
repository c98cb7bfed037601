"""The features service: events.valid + labels.valid -> entity state in Redis -> `features`.

For each event it computes the feature vector from its entity's state *before* the event, keeps
that vector in Redis under the event id (with a TTL, for the label's join), publishes it to
`features` (key entity_id), and folds the event into the state. A label updates its entity's last
known label. It must never let a label reach a vector of an event that came before the label, nor
fold the same event into a state twice.

    driftline serve features            # port settings.ports.features: /health, /metrics

How a batch goes (`FeaturesWorker.handle`):
1. decode; bad bytes go to events.dlq / labels.dlq with the reason (nothing crashes the loop);
2. `ReorderBuffer`: events and labels are merged by event time. A label with ts <= an event's ts
   is applied before that event's vector; each side waits for the other's partitions to pass its
   time, but at most `max_reorder_wait_ms` once they hold nothing unread (a backlog is read, not
   skipped); each partition stays in offset order; a partition far ahead is paused meanwhile.
   A feature set without `last_label` does not read labels.valid and waits for nothing;
3. one pipelined Redis read: the states of the batch's entities and the snapshots of the events
   that the batch's labels refer to (when the event is not in the batch itself);
4. in Python, in merged order: vector from the state, then `apply_event`; labels `apply_label`;
5. one pipelined Redis write: snapshots (with TTL), then each entity's state with its last applied
   offset in one HSET (atomic per key; keys are hash-tagged per entity, so cluster-ready), then the
   labels through a one-key script that keeps the label of the latest event;
6. produce the vectors, flush, commit the offsets up to the first item still waiting.

Bounds (untrusted input must not grow Redis or the model without end): an event that would bring
the model more than `features.max_feature_names` distinct field names, or its entity more than
`features.max_entity_fields`, or a text (categorical) field more than `features.max_categories`
distinct values, goes to events.dlq (`too_many_feature_names`, `too_many_entity_fields`,
`too_many_categories`) instead; entity states expire after `features.entity_ttl_s` idle.

Idempotence: an event at an offset <= its entity's `_off` was applied before a crash; it is not
applied again, its vector is re-published from its snapshot. Labels are idempotent by design.

Aggregates keyed by another field (docs/features.md): an event also reads, then folds into, the
state of each entity its key fields name (a merchant). Those events come from every partition and
every replica, so such a state keeps one guard per events.valid partition (`_o:<p>`: an event at
an offset <= it was folded before) and is written by compare-and-set (`FeatureStore.queue_keyed`):
a worker that lost the race reads the state again and refolds its events, in its batch's order.
Events of a worker's partitions are merged by event time first (`ReorderBuffer.align_events`).

The feature set comes from `settings.features.set`: `default`, `raw` or a TOML/YAML file with the
keys of `definitions.FeatureSpec` (each documented there, once; `example.toml` next to this file
shows them all).
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
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
from .definitions import ENTITY_KEY, FeatureSet, load_feature_set
from .store import GUARD_PREFIX, OFFSET_FIELD, PARTITION_FIELD, Categories, FeatureStore, FieldNames
from .windows import DROPPED, IN_ORDER, LATE

log = logging.getLogger(__name__)
SERVICE = "features"
KEYED_ATTEMPTS = 50  # compare-and-set rounds before the batch is given up (and read again from Kafka)
HANDLING = {LATE: "placed", DROPPED: "dropped"}
CLOCK_S = 0.05  # how often the partitions' clocks (features:clock) are written and read

# Merge order at equal event time: labels first (a label with ts <= the event's ts is applied
# before the event's vector), then events. Bad messages never wait (they only hold their offset).
BAD, LABEL, EVENT = 0, 1, 2


@dataclass
class Item:
    kind: int
    ts: float
    topic: str
    partition: int
    offset: int
    value: Any  # the decoded record, or the Message for a BAD item
    received: float = 0.0  # monotonic seconds
    seq: int = 0
    reason: str = ""
    detail: str = ""

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)


@dataclass
class ReorderBuffer:
    """Merges per-partition queues by event time, with a bounded wait for the other stream.

    An item goes when every partition of the other stream that has shown anything has shown an
    item at or after its time (so nothing earlier can still come from it, as far as partitions
    keep their own time order); or when it has waited `wait_s` and none of the partitions it
    waits for is `lagging` (holds unread data in the broker: that data is on its way, however
    long a backlog takes to read); or when more than `cap` items wait. Each partition goes in offset order, which keeps every
    entity's events in offset order.

        >>> buf = ReorderBuffer(wait_s=0.2)
        >>> buf.add(Item(EVENT, 10.0, "events.valid", 0, 0, {}))
        >>> buf.pop_ready(now=0.0)            # waits: no label at or after ts 10 yet
        []
    """

    wait_s: float
    cap: int = 20_000
    align_events: bool = False  # events also wait for this worker's event partitions still reading behind them
    queues: dict[tuple[str, int], deque[Item]] = field(default_factory=dict)
    latest: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)  # tp -> (kind, max ts seen)
    done: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to commit
    released: dict[tuple[str, int], float] = field(default_factory=dict)  # latest event time let go
    pending: int = 0
    _seq: int = 0

    def add(self, item: Item) -> None:
        q = self.queues.setdefault(item.tp, deque())
        if item.kind == BAD:  # released right after whatever precedes it in its partition
            item.ts = q[-1].ts if q else -math.inf
        else:
            _kind, seen = self.latest.get(item.tp, (item.kind, -math.inf))
            self.latest[item.tp] = (item.kind, max(seen, item.ts))
        self._seq += 1
        item.seq = self._seq
        q.append(item)
        self.pending += 1

    def expect(self, tp: tuple[str, int], kind: int) -> None:
        """A newly assigned partition that holds unread data: the other stream waits for it too
        (an empty one does not, or an idle partition would hold everything up)."""
        self.latest.setdefault(tp, (kind, -math.inf))

    def mark(self, kind: int) -> float:
        """How far in time every partition of a stream has got (-inf before it showed anything)."""
        return min((ts for k, ts in self.latest.values() if k == kind), default=-math.inf)

    def pop_ready(self, now: float, lagging: frozenset | set = frozenset(), floor: float = math.inf,
                  hold_s: float = 0.0) -> list[Item]:
        """The items that may go now, in merged order. An event later than `floor` (how far the
        other workers' partitions have got, plus the skew allowed) waits for them, at most `hold_s`."""
        heap = [(q[0].ts, q[0].kind, q[0].seq, tp) for tp, q in self.queues.items() if q]
        heapq.heapify(heap)
        marks = {LABEL: self.mark(EVENT), EVENT: self.mark(LABEL)}  # what each kind waits for
        behind = {LABEL: [], EVENT: []}  # per kind, the times of the other kind's lagging partitions
        events_behind = math.inf  # the earliest time a lagging event partition has shown
        for tp in lagging:
            if tp in self.latest:
                kind, ts = self.latest[tp]
                behind[LABEL if kind == EVENT else EVENT].append(ts)
                if kind == EVENT:
                    events_behind = min(events_behind, ts)
        if not self.align_events:
            events_behind = math.inf
        out: list[Item] = []
        while heap:
            tp = heap[0][3]
            q = self.queues[tp]
            head = q[0]
            # With aggregates keyed by another field, an entity's events come from every partition:
            # an event waits for the partitions of this worker that are still reading earlier times.
            aligned = head.kind != EVENT or (head.ts <= events_behind and (
                head.ts <= floor or now - head.received >= hold_s))
            if not (head.kind == BAD or self.pending > self.cap
                    or (aligned and (head.ts <= marks[head.kind] or (
                        now - head.received >= self.wait_s and all(ts >= head.ts for ts in behind[head.kind]))))):
                break  # everything after it in time waits too
            item = q.popleft()
            self.pending -= 1
            self.done[tp] = item.offset + 1
            if item.kind != BAD and item.ts > self.released.get(tp, -math.inf):
                self.released[tp] = item.ts
            out.append(item)
            if q:
                heapq.heapreplace(heap, (q[0].ts, q[0].kind, q[0].seq, tp))
            else:
                heapq.heappop(heap)
        return out

    def commit_offsets(self) -> dict[tuple[str, int], int]:
        """Per partition, the offset up to which everything is processed."""
        return {tp: (self.queues[tp][0].offset if self.queues.get(tp) else nxt) for tp, nxt in self.done.items()}

    def event_time_at_commit(self, tp: tuple[str, int]) -> float | None:
        """The least event time from the commit offset on, as far as the partition keeps its time
        order: the first waiting item's, else the latest let go (None: not known).

            >>> buf = ReorderBuffer(wait_s=0.0)
            >>> for offset, ts in enumerate((5.0, 7.0)):
            ...     buf.add(Item(EVENT, ts, "events.valid", 0, offset, {}))
            >>> [i.ts for i in buf.pop_ready(now=0.0)], buf.event_time_at_commit(("events.valid", 0))
            ([5.0, 7.0], 7.0)
        """
        q = self.queues.get(tp)
        ts = q[0].ts if q else self.released.get(tp)
        return ts if ts is not None and math.isfinite(ts) else None

    def drop(self, tps: list[tuple[str, int]]) -> None:
        """Forget partitions this consumer lost (their new owner starts from the committed offset)."""
        for tp in tps:
            self.pending -= len(self.queues.pop(tp, ()))
            self.latest.pop(tp, None)
            self.done.pop(tp, None)
            self.released.pop(tp, None)


class FeaturesWorker(StreamWorker):
    service = SERVICE

    def __init__(self, settings: Settings, feature_set: FeatureSet | None = None) -> None:
        super().__init__(settings)
        self.batch_size = settings.features.batch_size
        self.commit_interval_s = settings.features.commit_interval_s
        self.codec = get_codec()
        self.feature_set = feature_set or load_feature_set(settings.features.set)
        self.redis = deps.redis_client(settings)  # waits out a Redis outage
        self.store = FeatureStore(self.redis, Keys(settings.namespace), self.feature_set,
                                  settings.features.snapshot_ttl_s, service=SERVICE,
                                  entity_ttl_s=settings.features.entity_ttl_s)
        self.names = FieldNames(self.redis, Keys(settings.namespace), settings.learner.model_name,
                                settings.features.max_feature_names)
        self.categories = Categories(self.redis, Keys(settings.namespace), settings.learner.model_name,
                                     settings.features.max_categories)
        self.max_entity_fields = settings.features.max_entity_fields
        # A feature set without the last label has nothing to wait for: events go at once.
        wait_s = settings.features.max_reorder_wait_ms / 1000.0 if self.feature_set.spec.last_label else 0.0
        self.buffer = ReorderBuffer(wait_s=wait_s, cap=max(20 * self.batch_size, 1000),
                                    align_events=bool(self.feature_set.keys))
        self.clock_key = Keys(settings.namespace).features_clock()
        self._clock: dict[int, float] = {}  # events.valid partition -> event time folded up to (all workers)
        self._clock_read_at = self._clock_written_at = -math.inf
        self._partitions: set[int] = set()
        self.keyed_skew_s = settings.features.keyed_skew_ms / 1000.0
        self.keyed_hold_s = settings.features.keyed_hold_ms / 1000.0
        for key in ((ENTITY_KEY,) if ENTITY_KEY in self.feature_set.windows else ()) + self.feature_set.keys:
            for handling in HANDLING.values():
                metrics.LATE_EVENTS.labels(key, handling)
        self._positions: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self._highs: dict[tuple[str, int], int] = {}  # the broker's high watermark, as last known
        self._committed: dict[tuple[str, int], int] = {}
        self._paused: set[tuple[str, int]] = set()
        self._assigned: list[tuple[str, int]] = []
        # A partition with this many items waiting is paused, so that the consumer fetches the
        # other stream instead of buffering one (librdkafka hands out a partition in big chunks).
        self.max_waiting_per_partition = self.batch_size
        self.counts = {"events": 0, "labels": 0, "redelivered": 0, "labels_unmatched": 0, "dead_letters": 0,
                       "rebuilds": 0, "duplicates": 0, "late_events": 0, "keyed_conflicts": 0}
        self.applied_key = Keys(settings.namespace).features_applied()
        self._applied_local: dict[tuple[str, int], int] = {}  # the applied offsets this worker wrote last

    def input_topics(self) -> list[str]:
        if not self.feature_set.spec.last_label:
            return [self.topics.events_valid]
        return [self.topics.events_valid, self.topics.labels_valid]

    def open_consumer(self) -> Consumer:
        c = kafka.consumer(self.settings, self.topics.group(self.service), **kafka.MERGING_CONSUMER)
        c.subscribe(self.input_topics(), on_assign=self._on_assign, on_revoke=self._on_revoke)
        return c

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.rewind_to_applied(consumer, partitions)
        self._assigned.extend((p.topic, p.partition) for p in partitions)

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

    def verify_applied(self, items: list[Item]) -> None:
        """Before a batch touches Redis: are the applied offsets still those this worker wrote
        last? Lower = Redis restarted without its last writes; folding events into its older
        states would make wrong ones. Start the loop over instead: the new assignment re-reads
        from the applied offsets (rewind_to_applied), nothing of this batch was written."""
        tps = sorted({i.tp for i in items if i.tp in self._applied_local})
        if not tps:
            return
        stored = self.redis.hmget(self.applied_key, [f"{t}/{p}" for t, p in tps])
        behind = [tp for tp, v in zip(tps, stored) if v is None or int(v) < self._applied_local[tp]]
        if behind:
            self._applied_local.clear()
            raise RestartLoop(f"Redis lost writes this worker made (applied offset of {behind[0]} went back): "
                              "rebuilding the entity states from Kafka")

    def expect_assigned(self) -> None:
        """Tell the merge which new partitions still hold data (asked once per assignment)."""
        if not self._assigned or self.consumer is None:
            return
        tps, self._assigned = self._assigned, []
        try:
            committed = self.consumer.committed([TopicPartition(*tp) for tp in tps], timeout=10)
            for tp in committed:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=5)
                start = tp.offset if tp.offset >= 0 else low
                self._positions.setdefault((tp.topic, tp.partition), start)
                self._highs[(tp.topic, tp.partition)] = high
                if start < high:
                    kind = EVENT if tp.topic == self.topics.events_valid else LABEL
                    self.buffer.expect((tp.topic, tp.partition), kind)
        except KafkaException:  # best effort: without it, the bounded wait still applies
            log.warning("could not read the new partitions' offsets", exc_info=True)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.settle_on_revoke(consumer, partitions)  # commit what was handled while the partitions are ours
        tps = [(p.topic, p.partition) for p in partitions]
        if self.feature_set.keys:
            self.publish_clock(revoked=tps)  # the others wait for their next owner
        self.buffer.drop(tps)
        paused = [TopicPartition(*tp) for tp in tps if tp in self._paused]
        if paused:  # a pause outlives a rebalance in librdkafka; never hand one on
            consumer.resume(paused)
        for tp in tps:
            self._committed.pop(tp, None)
            self._applied_local.pop(tp, None)
            self._paused.discard(tp)
            self._positions.pop(tp, None)
            self._highs.pop(tp, None)

    def flow_control(self) -> None:
        """Pause partitions whose items wait for the other stream; resume them once drained.
        On resume, librdkafka fetches again from the last message it handed us."""
        assert self.consumer is not None
        limit = self.max_waiting_per_partition
        pause = [tp for tp, q in self.buffer.queues.items() if len(q) > limit and tp not in self._paused]
        resume = [tp for tp in self._paused if len(self.buffer.queues.get(tp, ())) <= limit // 2]
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
                self.buffer.add(self.decode(m, now))
                self._positions[(m.topic(), m.partition())] = m.offset() + 1
        self.process(self.pop_ready())
        self.flow_control()

    def tick(self) -> None:
        """Between batches: let items go whose wait is over, then flush and commit them."""
        self.expect_assigned()
        if self.feature_set.keys:
            self.publish_clock()
        if self.buffer.pending:
            items = self.pop_ready()
            if items:
                self.process(items)
                if self.commits.flush_until_stopped():  # a rebalance or an outage refusing the commit is not fatal
                    self.commits.safe_commit()
            self.flow_control()

    def pop_ready(self) -> list[Item]:
        """What the merge lets go now. With key entities, events also wait (at most
        features.keyed_hold_ms) for the other workers' partitions to get within
        features.keyed_skew_ms of their time: that bounds how stale a key entity's aggregates are."""
        floor = math.inf
        if self.feature_set.keys:
            self.refresh_clock()
            mine = {p for t, p in self._positions if t == self.topics.events_valid}
            others = self.partitions() - mine  # a partition no worker has said anything of yet: unknown
            floor = min((self._clock.get(p, -math.inf) for p in others), default=math.inf) + self.keyed_skew_s
        return self.buffer.pop_ready(time.monotonic(), self.lagging(), floor, self.keyed_hold_s)

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
        offsets = []
        for (t, p), o in self.buffer.commit_offsets().items():
            if self._committed.get((t, p)) != o:
                ts = self.buffer.event_time_at_commit((t, p))
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
        self.verify_applied(items)
        fs = self.feature_set
        items = self.bound_fields(items)
        events = [i.value for i in items if i.kind == EVENT]
        in_batch = {e["event_id"]: (e["entity_id"], e["ts"]) for e in events}
        wanted = [i.value["event_id"] for i in items if i.kind == LABEL and i.value["event_id"] not in in_batch]
        with _stage("read"):
            entity_ids = [e["entity_id"] for e in events] if fs.stateful else []
            named = [kv for e in events for kv in fs.key_values(e["fields"]).items()] if fs.keys else []
            read = self.store.read_batch(entity_ids, wanted if fs.spec.last_label else (),
                                         folded_of=[e["event_id"] for e in events], keyed=named)
            states, snapshots, folded, keyed = read.states, read.snapshots, read.folded, read.keyed
        with _stage("compute"):
            vectors, markers, dirty, redelivered = [], [], set(), []
            folds: dict[tuple[str, str], list[Item]] = {}  # key entity -> the events folded into it
            labels: dict[str, tuple[str, float]] = {}  # entity -> its latest label in the batch
            for item in items:
                if item.kind == EVENT:
                    ev = item.value
                    marker = f"{item.partition}:{item.offset}"
                    if folded.setdefault(ev["event_id"], marker) != marker:
                        # A copy of an event folded already from another input (store.FOLDED_FIELD)
                        self.counts["duplicates"] += 1
                        metrics.DUPLICATES.labels(SERVICE, "events.valid").inc()
                        continue
                    state = states.get(ev["entity_id"], {})
                    names = fs.key_values(ev["fields"]) if fs.keys else {}
                    if _applied(state, item):
                        redelivered.append(ev["event_id"])
                        self.fold_keyed(item, names, keyed, folds)  # unless they were folded too
                        continue
                    new = fs.untracked(state, ev["fields"]) if fs.stateful else ()
                    if new and len(fs.tracked(state)) + len(new) > self.max_entity_fields:
                        self.refuse(item, "too_many_entity_fields",
                                    f"entity {ev['entity_id'][:40]!r} would track more than "
                                    f"{self.max_entity_fields} distinct fields (features.max_entity_fields)")
                        in_batch.pop(ev["event_id"], None)  # its label must not reach the state either
                        continue
                    x = fs.vector(state, ev["fields"], ev["ts"], keyed={k: keyed[(k, v)] for k, v in names.items()})
                    vectors.append(self.vector_of(ev, x))
                    markers.append(marker)
                    if names:
                        self.observe_staleness(ev["ts"])
                    if fs.stateful:
                        self.count_late(ENTITY_KEY, fs.apply_event(state, ev["fields"], ev["ts"]))
                        state[OFFSET_FIELD], state[PARTITION_FIELD] = item.offset, item.partition
                        dirty.add(ev["entity_id"])
                    self.fold_keyed(item, names, keyed, folds)
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
            blobs = [self.codec.encode("FeatureVector", fv) for fv in vectors]
        with _stage("write"):
            pipe = self.redis.pipeline(transaction=False)
            # snapshots before states: a state's `_off` then implies its events' snapshots exist
            self.store.queue_snapshot_blobs(pipe, ((fv["event_id"], b, m) for fv, b, m in zip(vectors, blobs, markers)))
            self.store.queue_states(pipe, {e: states[e] for e in dirty})
            for entity_id, (label, event_ts) in labels.items():
                self.store.queue_label(pipe, entity_id, label, event_ts)
            first_keyed = len(pipe)
            for key, value in folds:
                self.store.queue_keyed(pipe, key, value, keyed[(key, value)])
            # Last: how far this batch's effects go (the AOF keeps a prefix of the writes).
            applied = {i.tp: i.offset + 1 for i in items}
            pipe.hset(self.applied_key, mapping={f"{t}/{p}": o for (t, p), o in applied.items()})
            replies = self.store.execute(pipe, "write_batch")
            lost = [kv for kv, ok in zip(folds, replies[first_keyed:first_keyed + len(folds)]) if not ok]
            if lost:
                self.refold(lost, folds)
            self._applied_local.update(applied)
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

    # -- key entities: folded by every worker, guarded per partition, written by compare-and-set
    def fold_keyed(self, item: Item, names: dict[str, str], keyed: dict, folds: dict, count: bool = True) -> None:
        """Fold an event into the key entities it names, unless its offset says it already was."""
        ev = item.value
        guard = f"{GUARD_PREFIX}{item.partition}"
        for key, value in names.items():
            state = keyed[(key, value)]
            if state.get(guard, -1) >= item.offset:
                continue  # folded before a crash, or by this worker's previous round
            outcome = self.feature_set.apply_keyed(key, state, ev["fields"], ev["ts"], ev["entity_id"])
            state[guard] = item.offset
            folds.setdefault((key, value), []).append(item)
            if count:
                self.count_late(key, outcome)

    def refold(self, lost: list[tuple[str, str]], folds: dict[tuple[str, str], list[Item]]) -> None:
        """Another worker wrote these key entities between our read and our write: read them
        again, fold this batch's events in again (the guards skip what is in already), retry."""
        for attempt in range(KEYED_ATTEMPTS):
            self.counts["keyed_conflicts"] += len(lost)
            metrics.KEYED_CONFLICTS.inc(len(lost))
            fresh = self.store.read_keyed(lost)
            pipe = self.redis.pipeline(transaction=False)
            for key, value in lost:
                for item in folds[(key, value)]:
                    self.fold_keyed(item, {key: value}, fresh, {}, count=False)
                self.store.queue_keyed(pipe, key, value, fresh[(key, value)])
            replies = self.store.execute(pipe, "write_keyed")
            lost = [kv for kv, ok in zip(lost, replies) if not ok]
            if not lost:
                return
            time.sleep(0.001 * (attempt + 1))
        raise RestartLoop(f"{len(lost)} key entities kept changing under this worker's writes; reading the batch again")

    def count_late(self, key: str, outcome: int) -> None:
        if outcome != IN_ORDER:
            self.counts["late_events"] += 1
            metrics.LATE_EVENTS.labels(key, HANDLING[outcome]).inc()

    # -- the partitions' clocks: how far each events.valid partition is folded, for every worker
    def publish_clock(self, revoked: list[tuple[str, int]] = ()) -> None:
        """Per events.valid partition of this worker: the event time its events are folded up to
        (the first one still waiting, else the latest let go), "inf" when nothing of it is left to
        read, "-inf" when nothing of it was read yet; a partition handed on is "-inf" until its
        next owner says. Written every CLOCK_S, also while events wait: the earliest waiting
        event of all workers is always free to go."""
        now = time.monotonic()
        if not revoked and now - self._clock_written_at < CLOCK_S:
            return
        self._clock_written_at = now
        lagging = self.lagging() if self.consumer is not None and not revoked else set()
        clock = {str(p): "-inf" for t, p in revoked if t == self.topics.events_valid}
        for tp in self._positions:
            if tp[0] != self.topics.events_valid or revoked:
                continue
            ts = self.buffer.event_time_at_commit(tp)
            if not self.buffer.queues.get(tp) and tp not in lagging:
                clock[str(tp[1])] = "inf"
            else:
                clock[str(tp[1])] = "-inf" if ts is None else repr(ts)
        if clock:
            try:
                self.redis.hset(self.clock_key, mapping=clock)
            except redis.RedisError:  # the next tick says it again
                log.warning("could not write the partitions' clocks", exc_info=True)

    def partitions(self) -> set[int]:
        """The partitions of events.valid (asked once)."""
        if not self._partitions and self.consumer is not None:
            try:
                meta = self.consumer.list_topics(self.topics.events_valid, timeout=5)
                self._partitions = set(meta.topics[self.topics.events_valid].partitions)
            except (KafkaException, KeyError):
                log.warning("could not read the partitions of %s", self.topics.events_valid, exc_info=True)
        return self._partitions

    def refresh_clock(self) -> None:
        if time.monotonic() - self._clock_read_at >= CLOCK_S:
            self._clock = {int(p): float(ts) for p, ts in self.redis.hgetall(self.clock_key).items()}
            self._clock_read_at = time.monotonic()

    def observe_staleness(self, ts: float) -> None:
        """Events older than the slowest partition's clock are all folded; younger ones may not be."""
        slowest = min(self._clock.values(), default=math.inf)
        metrics.KEYED_STALENESS.observe(max(0.0, ts - slowest) if math.isfinite(slowest) else 0.0)

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
        return {**super().health(), "feature_set": self.feature_set.name, "waiting": self.buffer.pending,
                **self.counts}

    def close(self) -> None:
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
