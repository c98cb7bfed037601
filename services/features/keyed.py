"""Aggregates keyed by another field: one stage per key field, the only writer of its key entities
(docs/features.md, "Several entities per event").

Events come keyed by their own entity (a card), so the events of one merchant are on every
partition. The features service sends each event on, through internal topics, to the stage of its
first key field, as Kafka Streams repartitions: `features.by.<key>.<source>` has one topic per
partition `source` of the stage before (events.valid for the first key field), each with as many
partitions as events.valid, and an event goes to the partition its key value hashes to
(`key_partition`). The worker that owns partition k of events.valid owns partition k of every
internal topic too (the range assignor gives a member the same partitions of topics that have as
many), so one worker reads and writes all the entities of key partition k.

That worker merges the sources of partition k by event time (`merge.WatermarkMerge`) and, for each
event in that order, reads its key entity's aggregates into the vector, then folds the event in: the
order one process reading the whole stream would follow. Then it sends the event on to the next key
field's stage (`Forwarder`). After the last key field comes the vectors' stage (key `entity_id`,
`features.by.entity_id.<source>`): each event goes back to its own entity's partition (the
events.valid partition it came from), whose owner merges what every key partition sends it by event
time again, publishes the whole vector to that partition of `features` and keeps it as the event's
snapshot. What is scored is therefore what was computed here, once, and each features partition has
one writer and the stream's order, as without key fields (published straight from the last key
field's stage, a features partition interleaved what every merchant partition let go: days of event
time out of order, and the learner, which reads a partition's latest event time as how far it has
got, learned labels before the events they follow).

It must never fold an event twice: each key entity keeps, per events.valid partition (and key
partitions it came through: `guard_field`), the offset of the last event folded from it, written
with the state; an event at or below it was folded before a crash, and is not again. A stage sends
an event on only after the broker has acknowledged what it sent before writing the states that say
so (`flush` first). The vectors' stage keeps no state: a redelivered event is published again, the
same vector, and the learner drops the copy.
Entities are cached here (the owner is their only writer); a write that finds another writer's
version (`_v`, compare-and-set) means two workers thought they owned them: the loop starts over.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from confluent_kafka import Producer

from ..shared import kafka, metrics
from ..shared.codec import AvroCodec, DecodeError
from ..shared.loop import RestartLoop
from ..shared.redis_clients import per_key
from ..shared.topics import Topics
from .cache import StateCache
from .definitions import ENTITY_KEY, FeatureSet, State
from .merge import Pending, WatermarkMerge
from .store import GUARD_PREFIX, VERSION_FIELD, FeatureStore, decode_state, hashes_reply, queue_read_hashes
from .windows import DROPPED, IN_ORDER, LATE, key_text, value_hash

log = logging.getLogger(__name__)
WATERMARK_EVERY_S = 0.05  # how often a source's watermarks may go out when its mark moves
HEARTBEAT_S = 0.5  # and at least this often, moved or not: a writer that is silent for long has stopped
SILENCE_S = 3 * HEARTBEAT_S  # after this long without a word, an idle source is no longer taken as idle
HANDLING = {LATE: "placed", DROPPED: "dropped"}


def key_partition(value: str, partitions: int) -> int:
    """The partition of an internal topic that key value `value` goes to (the same in every process).

        >>> key_partition("m-17", 6) == key_partition("m-17", 6) < 6
        True
    """
    return int(value_hash(value)) % partitions


class Forwarder:
    """Sends events on to one key field's stage, in the order given, from `source` (a partition of
    the stage before it) to partition `key_partition(to)` of `features.by.<key>.<source>`, one
    message per partition and batch (`send` queues, `flush` writes); and the watermarks of the
    sources it writes for, to every partition that has not heard them (all of them again after a
    rebalance: `forget`)."""

    def __init__(self, producer: Producer, codec: AvroCodec, topics: Topics, key: str, partitions: int,
                 service: str) -> None:
        self.producer = producer
        self.codec = codec
        self.topics = topics
        self.key = key
        self.partitions = partitions
        self.topic_of = [topics.keyed(key, s) for s in range(partitions)]
        self.queued: dict[tuple[int, int], list[dict[str, Any]]] = {}  # (source, partition) -> events
        self.told: dict[tuple[int, int], tuple[float, bool, float]] = {}  # (source, partition) -> (mark, idle, when)
        self.said_at = -math.inf
        self.sent = metrics.MESSAGES_OUT.labels(service, f"features.by.{key}")

    def send(self, source: int, order: tuple[float, int, int], event: dict[str, Any], to: str,
             route: list[int]) -> None:
        """Queue an event for the partition key value `to` hashes to (to the vectors' stage: the
        events.valid partition it came from, its own entity's); `event` has the event's record
        fields and `features`, and becomes the KeyedEvent itself (completed here, not copied: the
        caller hands it over); `route`: the key partitions it went through before (its copies keep
        their order along it)."""
        partition = order[1] if self.key == ENTITY_KEY else key_partition(to, self.partitions)
        event["order_ts"], event["origin_partition"], event["origin_offset"], event["route"] = \
            order[0], order[1], order[2], route
        self.queued.setdefault((source, partition), []).append(event)

    def flush(self) -> None:
        """Write what `send` queued: one message per (source, partition), its events in order."""
        now = time.monotonic()
        for (source, k), events in self.queued.items():
            mark = events[-1]["order_ts"]
            blob = self.codec.encode("KeyedEvents", {"mark": mark, "idle": False, "events": events})
            kafka.produce(self.producer, self.topic_of[source], blob, partition=k)
            self.told[(source, k)] = (mark, False, now)
            self.sent.inc(len(events))
        self.queued.clear()

    def watermarks(self, now: float, marks: dict[int, tuple[float, bool]]) -> None:
        """Per source of ours, (mark, idle): said to each partition that has not heard it, at most
        every WATERMARK_EVERY_S, and again every HEARTBEAT_S (the partners' proof that it is alive)."""
        if now - self.said_at < WATERMARK_EVERY_S:
            return
        self.said_at = now
        for source, (mark, idle) in marks.items():
            for k in range(self.partitions):
                told = self.told.get((source, k))
                if told is None or mark > told[0] or idle != told[1] or now - told[2] >= HEARTBEAT_S:
                    blob = self.codec.encode("KeyedEvents", {"mark": mark, "idle": idle, "events": []})
                    kafka.produce(self.producer, self.topic_of[source], blob, partition=k)
                    self.told[(source, k)] = (mark, idle, now)

    def forget(self) -> None:
        """After a rebalance: say everything again (the partitions may have new owners)."""
        self.queued.clear()
        self.told.clear()
        self.said_at = -math.inf


class KeyStage:
    """The stage of one key field in one worker: the merges of the key partitions it owns, their
    entities' states (cached, bounded), and what goes on (`forward`). With key `entity_id`, the
    vectors' stage: no state; it publishes each event's vector to its partition of `features`."""

    def __init__(self, *, feature_set: FeatureSet, key: str, store: FeatureStore, topics: Topics,
                 codec: AvroCodec, partitions: int, produce: Callable[..., None],
                 flush: Callable[[], None], forward: Forwarder | None, idle_wait_s: float, hold_s: float,
                 cache_entities: int, queue_limit: int, service: str) -> None:
        self.fs = feature_set
        self.key = key
        self.store = store
        self.topics = topics
        self.codec = codec
        self.partitions = partitions
        self.produce = produce
        self.flush = flush
        self.forward = forward  # None: the vectors' stage, which publishes
        self.aggregates = key != ENTITY_KEY  # False: the vectors' stage
        self.last_key = forward is not None and forward.key == ENTITY_KEY  # sends whole vectors on
        self.idle_wait_s = idle_wait_s
        self.hold_s = hold_s
        self.queue_limit = queue_limit
        self.service = service
        self.topic_of = [topics.keyed(key, s) for s in range(partitions)]
        self.source_of = {t: s for s, t in enumerate(self.topic_of)}
        self.merges: dict[int, WatermarkMerge] = {}  # key partition -> its sources' merge
        self.cache = StateCache(cache_entities)  # key text -> state (this worker is its only writer)
        if self.aggregates:
            self.ttl_s = feature_set.key_ttl_s(key, store.entity_ttl_s)
            self.counts = {"keyed_events": 0, "keyed_duplicates": 0, "keyed_stale": 0}
            self.late = {outcome: metrics.LATE_EVENTS.labels(key, handling) for outcome, handling in HANDLING.items()}
            self.staleness = metrics.KEYED_STALENESS.labels(key)
            self.stale = metrics.KEYED_STALE.labels(key)
        else:
            self.counts = {"vectors_published": 0}
        self.seconds = metrics.PROCESSING_SECONDS.labels(service, "keyed")

    # -- partitions ------------------------------------------------------------------------------
    def topics_read(self) -> list[str]:
        return list(self.topic_of)

    def assigned(self, tps: list[tuple[str, int]], now: float) -> None:
        """Partitions of our topics given to this worker: a merge per key partition, over all sources."""
        for topic, k in tps:
            if topic in self.source_of and k not in self.merges:
                self.merges[k] = WatermarkMerge(range(self.partitions), self.idle_wait_s, self.hold_s, now,
                                                silence_s=SILENCE_S)

    # -- in ----------------------------------------------------------------------------------------
    def take(self, topic: str, k: int, offset: int, blob: bytes, now: float) -> bool:
        """A message of ours: events for the merge, and how far their source has got. False: it is
        not readable (written by something else than driftline; the caller counts it)."""
        merge = self.merges.get(k)
        if merge is None:  # a partition we no longer own (its messages still in the fetch queue)
            return True
        try:
            record = self.codec.decode(blob, expect="KeyedEvents")
        except DecodeError as exc:
            log.warning("%s/%d@%d: not KeyedEvents (%s); skipped", topic, k, offset, exc)
            return False
        source = self.source_of[topic]
        for ev in record["events"]:
            merge.add(source, offset, (ev["order_ts"], ev["origin_partition"], ev["origin_offset"]), now, ev)
        merge.watermark(source, offset, record["mark"], now, idle=record["idle"])
        return True

    # -- the stage -------------------------------------------------------------------------------
    def process(self, now: float, lagging: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Let go what the merges allow, compute, write, send on. Returns the input offsets applied
        ((topic, partition) -> next offset), for the caller's record of them."""
        released: list[tuple[int, Pending]] = []
        for k, merge in self.merges.items():
            behind = {s for s in range(self.partitions) if (self.topic_of[s], k) in lagging}
            released += [(k, r) for r in merge.pop_ready(now, behind)]
        if not released:
            return {}
        started = time.perf_counter()
        states = self._states({key_text(r.value["fields"][self.key]) for _, r in released
                               if self.key in r.value["fields"]}) if self.aggregates else {}
        fs, key = self.fs, self.key
        dirty: set[str] = set()
        vectors: list[tuple[str, str, int, bytes]] = []  # event id, entity id, features partition, FeatureVector
        applied: dict[tuple[str, int], int] = {}
        for k, r in released:
            ev = r.value
            fields = ev["fields"]
            applied[(self.topic_of[r.source], k)] = r.offset + 1
            _ts, origin, offset = r.order
            value = fields.get(key) if self.aggregates else None
            if value is not None:
                name = key_text(value)
                state = states[name]
                guard = guard_field(origin, tuple(ev["route"]))
                if state.get(guard, -1) >= offset:  # folded before a crash: sent on then
                    self.counts["keyed_duplicates"] += 1
                    continue
                fs.key_features(key, state, ev["ts"], ev["features"])
                outcome = fs.apply_keyed(key, state, fields, ev["ts"], ev["entity_id"])
                state[guard] = offset
                dirty.add(name)
                if outcome != IN_ORDER:
                    self.late[outcome].inc()
                self._observe(r.staleness)
            if self.forward is None:  # the vectors' stage
                self.counts["vectors_published"] += 1
                vectors.append((ev["event_id"], ev["entity_id"], k, ev["vector"]))
                continue
            self.counts["keyed_events"] += 1
            route = [*ev["route"], k]
            if self.last_key:
                # The last key field: the vector is whole. It goes on encoded as it will be published
                # (the vectors' stage only orders it), without the fields and features it holds.
                self.forward.send(k, r.order, {"event_id": ev["event_id"], "entity_id": ev["entity_id"],
                                               "ts": ev["ts"], "fields": {}, "published_ms": ev.get("published_ms"),
                                               "features": {}, "vector": self._vector(ev)}, ev["entity_id"], route)
            else:
                to = fields.get(self.forward.key)
                self.forward.send(k, r.order, ev, ev["entity_id"] if to is None else key_text(to), route)
        self._write(vectors, {name: states[name] for name in dirty}, applied)
        for _event_id, entity_id, partition, blob in vectors:
            self.produce(self.topics.features, blob, entity_id, partition=partition)
        self.seconds.observe(time.perf_counter() - started)
        return applied

    def _vector(self, ev: dict[str, Any]) -> bytes:
        """The event's whole FeatureVector, encoded: its fields' features and those computed so far."""
        return self.codec.encode("FeatureVector", {
            "event_id": ev["event_id"], "entity_id": ev["entity_id"], "ts": ev["ts"],
            "features": {**self.fs.field_features(ev["fields"]), **ev["features"]},
            "feature_set": self.fs.name, "published_ms": ev.get("published_ms")})

    def _observe(self, staleness: float | None) -> None:
        if staleness is None or staleness > 0:
            self.counts["keyed_stale"] += 1
            self.stale.inc()
        if staleness is not None:
            self.staleness.observe(staleness)

    def _write(self, vectors: list[tuple[str, str, int, bytes]], dirty: dict[str, State],
               applied: dict[tuple[str, int], int]) -> None:
        """What was sent on is acknowledged first (a state that says "folded" implies it), then one
        pipeline: the vectors' snapshots, the states (compare-and-set), the applied offsets."""
        if self.forward is not None:
            self.forward.flush()
            self.flush()
        pipe = self.store.client.pipeline(transaction=False)
        if vectors:
            self.store.queue_snapshot_blobs(pipe, [(event_id, blob, "") for event_id, _, _, blob in vectors])
        first = len(pipe)
        names = list(dirty)
        groups = self.store.queue_keyed(pipe, self.key, dirty, self.ttl_s) if dirty else []
        self.store.queue_applied(pipe, applied)
        replies = self.store.execute(pipe, f"write_{self.key}")
        written = per_key(groups, replies[first:first + len(groups)])
        lost = [name for name, ok in zip(names, written) if not ok]
        for name, ok in zip(names, written):
            if ok:
                state = dirty[name]
                state[VERSION_FIELD] = int(state.get(VERSION_FIELD) or 0) + 1
        if lost:
            metrics.KEYED_CONFLICTS.inc(len(lost))
            self.cache.clear()
            raise RestartLoop(f"{len(lost)} {self.key} entities were written by another worker meanwhile "
                              f"(two owners of one key partition, a rebalance under way): reading them again")

    def _states(self, names: set[str]) -> dict[str, State]:
        """The states of these key entities: cached, else read in one round trip."""
        out, missing = {}, []
        for name in names:
            state = self.cache.get(name)
            if state is None:
                missing.append(name)
            else:
                out[name] = state
        if missing:
            pipe = self.store.client.pipeline(transaction=False)
            groups = queue_read_hashes(pipe, [self.store.keys.keyed_entity(self.key, name) for name in missing])
            for name, raw in zip(missing, hashes_reply(groups, self.store.execute(pipe, f"read_{self.key}"))):
                out[name] = decode_state(raw)
                self.cache.put(name, out[name])
        return out

    # -- where it stands -------------------------------------------------------------------------
    def marks(self, now: float, lagging: set[tuple[str, int]]) -> dict[int, tuple[float, bool]]:
        """Per key partition of ours, how far what it lets go has got (the next stage's watermarks)."""
        out = {}
        for k, merge in self.merges.items():
            out[k] = merge.mark(now, {s for s in range(self.partitions) if (self.topic_of[s], k) in lagging})
        return out

    def commit_offsets(self) -> list[tuple[tuple[str, int], int, float | None]]:
        """((topic, partition), offset, event time there) for every input partition with progress."""
        out = []
        for k, merge in self.merges.items():
            for s, topic in enumerate(self.topic_of):
                offset = merge.commit_offset(s)
                if offset is not None:
                    out.append(((topic, k), offset, merge.event_time_at_commit(s)))
        return out

    def crowded(self) -> set[tuple[str, int]]:
        """Input partitions whose queues are long (the caller pauses them; a paused one holds nothing up)."""
        return {(self.topic_of[s], k) for k, merge in self.merges.items() for s in range(self.partitions)
                if merge.queued(s) > self.queue_limit}

    def waiting(self) -> int:
        return sum(m.pending for m in tuple(self.merges.values()))  # a copy: /health asks from another thread


@lru_cache(maxsize=65_536)
def guard_field(origin: int, route: tuple[int, ...]) -> str:
    """A key entity's field with the offset of the last event folded in that came from events.valid
    partition `origin` through the key partitions `route`: along one such path an event's copies
    keep their order (each stage lets one source's records go in order), so an offset at or below
    it is a copy, never an event that came the other way round.

        >>> guard_field(3, ()), guard_field(3, (1,))
        ('_o:3', '_o:3.1')
    """
    return GUARD_PREFIX + ".".join(map(str, (origin, *route)))

