"""The learner's worker: scores every event with the champion (and challenger), learns once from every label.

One active learner per model name holds a Redis lease; another instance waits as a standby and
takes over from the last checkpoint when the active one stops renewing. The active learner reads
all partitions of `features`, `labels.valid`, `retrain.requests` and `model.swaps` from the offsets
of its checkpoint (never group-managed offsets: the checkpoint *is* the commit), and per batch:

    decode -> control (retrain, swaps) -> release the events whose older labels are all in
    (ordering.py) -> walk them in ts order: learn the labels due before each one, joined with the
    event's vector and predictions (join.py), then score it (champion.py) -> one Redis pipeline +
    produce -> checkpoint every N labels / T seconds (checkpoint.py)

A retrain request builds a challenger warm-started on the labels since the drift's change point,
replayed test-then-train against the champion's recorded answers, so the contest has its evidence
at once however late the request came; it may promote on the spot (lineage.py records it).

It must never learn a label twice nor skip one: offsets, models, waiting labels and counters are
checkpointed together, and after a crash the outcomes already published since the checkpoint are
read back so that those labels are re-learned in the same order without being published again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Any

import redis
from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition

from ..features.store import Snapshot, Snapshots
from ..shared import kafka, metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.deadletter import dead_letter
from ..shared.kafka import base_topic
from ..shared.keys import Keys
from ..shared.registry import ModelRegistry
from ..shared.runtime import StreamWorker
from ..shared.settings import Settings
from ..shared.swaps import publish_swap
from .champion import Contest, Roles, Slot
from .checkpoint import Lease, LearnerState, high_watermark, load_checkpoint, outcomes_since, save_checkpoint
from .join import DelayedJoin
from .lineage import Lineage
from .ordering import HeldEvents, LabelWatermark
from .records import Control, Event, Label, decode
from .telemetry import Telemetry

log = logging.getLogger(__name__)
SERVICE = "learner"


class LearnerWorker(StreamWorker):
    service = SERVICE
    batch_size = 1000
    poll_timeout_s = 0.05

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.cfg = settings.learner
        self.name = self.cfg.model_name
        self.keys = Keys(settings.namespace)
        self.codec = get_codec()
        self.r = redis.Redis.from_url(settings.redis_url)
        self.signing_key = settings.model_key.get_secret_value().encode()
        self.registry = ModelRegistry(self.r, self.keys, self.name, self.signing_key)
        self.lineage = Lineage(self.registry, self.cfg, self.publish_swap)
        self.lease = Lease(self.r, self.keys.lease(self.name), self.cfg.lease_ttl_s)
        self.snapshots = Snapshots(self.r, self.keys, settings.features.snapshot_ttl_s, SERVICE)
        self.hold_s = settings.features.max_reorder_wait_ms / 1000
        self.telemetry = Telemetry(self.name)
        self.state, self.control, self.roles = "standby", None, None
        self.reset_session()

    def reset_session(self, state: LearnerState | None = None) -> None:
        """Everything a checkpoint holds (from `state`), plus this session's bookkeeping."""
        self.roles: Roles | None = state.roles if state else None
        self.offsets: dict[tuple[str, int], int] = state.offsets if state else {}
        self.position = state.position if state else 0  # champion labels learned so far
        self.join = DelayedJoin(self.hold_s, max(5 * self.hold_s, self.cfg.label_grace_s / 3), self.cfg.label_grace_s,
                                state.waiting if state else (), state.clock if state else float("-inf"))
        self.held = HeldEvents(state.held_events if state else (), name=self.name)
        self.held_control: list[Control] = state.held_control if state else []
        self.watermark = LabelWatermark(self.cfg.label_idle_s, state.label_ts_by_partition if state else None)
        self.label_partitions: list[TopicPartition] = []
        self.rescore_below: dict[tuple[str, int], int] = {}  # offsets consumed before this session
        self.replay: deque[str] = deque()  # labels to re-learn first, in their published order
        self.suppress: set[tuple[str, str]] = set()  # (event_id, role) outcomes already published
        self.replay_deadline = self.next_retry = 0.0
        self.dirty = self.checkpoint_now = False
        self.since_checkpoint = self.since_update = 0
        self.last_checkpoint = self.last_update = time.monotonic()
        self.buffer: list[str] = []  # examples for the warm-start buffer, pushed once per batch
        self.pipe = None

    # -- the session: standby until the lease is ours, then the base loop until it is not -----
    def run(self) -> None:
        while not self._stop.is_set():
            if not self.lease.try_acquire():
                self._stop.wait(min(1.0, self.cfg.lease_ttl_s / 4))
                continue
            log.info("learner %s: lease taken, active", self.name)
            try:
                super().run()
            except BaseException:
                self.lease.release()  # let a standby try; this process reports the error on /health
                raise
            finally:
                self.state = "standby"
                if self.control is not None:
                    self.control.close()
                self.control = None

    def running(self) -> bool:
        return super().running() and not self.lease.lost.is_set()

    def open_consumer(self):
        self.restore()
        consumer = self.assign([self.topics.features, self.topics.labels_valid])
        # Control has a consumer of its own: in one consumer, librdkafka's prefetch queue would put
        # a retrain request behind megabytes of backlog, and the challenger would come too late.
        self.control = self.assign([self.topics.retrain_requests, self.topics.model_swaps])
        self.state = "active"
        return consumer

    def assign(self, topics: list[str]):
        # The group id is the service's (lag tools read its offsets); the position is the checkpoint's.
        c = kafka.consumer(self.settings, self.topics.group(SERVICE))
        parts = []
        for topic in topics:
            for tp in kafka.partitions_of(self.settings, topic):
                parts.append(TopicPartition(topic, tp.partition, self.offsets.get((topic, tp.partition),
                                                                                  OFFSET_BEGINNING)))
                if topic == self.topics.features:  # events up to here may have been scored before
                    self.rescore_below[(topic, tp.partition)] = c.get_watermark_offsets(tp, timeout=10.0,
                                                                                        cached=False)[1]
                elif topic == self.topics.labels_valid:
                    self.label_partitions.append(parts[-1])
        c.assign(parts)
        return c

    def next_batch(self) -> list[Message]:
        control = self.control.consume(num_messages=100, timeout=0)
        return control + self.consumer.consume(num_messages=self.batch_size, timeout=self.poll_timeout_s)

    def flush_until_stopped(self) -> bool:
        return True  # nothing to wait for per batch: a checkpoint (the commit) flushes first

    def commit(self) -> None:
        """The checkpoint is the commit (see `checkpoint`)."""

    def close(self) -> None:
        if self.lease.lost.is_set():
            log.error("learner %s: lease lost; stopping without a checkpoint", self.name)
        else:
            self.checkpoint(force=True)
            self.lease.release()

    # -- a batch ---------------------------------------------------------------------------------
    def handle(self, messages: list[Message]) -> None:
        now = time.time()
        events, labels = [], []
        for m in messages:
            self.offsets[(m.topic(), m.partition())] = m.offset() + 1
            self.dirty = True
            try:
                record = decode(self.codec, base_topic(m.topic()), m.topic(), m.partition(), m.offset(), m.key(),
                                m.value(), now)
            except DecodeError as exc:
                self.undecodable(m, exc)
                continue
            {Event: events, Label: labels, Control: self.held_control}[type(record)].append(record)
        if events:
            self.watermark.saw_features(now)
        self.watermark.saw_labels(((lb.partition, lb.ts) for lb in labels), now)
        self.join.add(labels)
        self.held.add(events)
        self.pipe = self.r.pipeline(transaction=False)
        if self.replay:
            self.catch_up()
        if not self.replay:
            # Control first: a retrain request read now must not wait for the batch's examples.
            control, self.held_control = self.held_control, []
            for c in control:
                if c.value.get("model") == self.name:
                    {"retrain": self.start_challenger, "swap": self.follow_swap}[c.kind](c.value)
            self.step(self.held.release(self.label_watermark(), time.time()))
        self.flush_batch()

    def label_watermark(self) -> float:
        parts = []
        for tp in self.label_partitions:
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            parts.append((tp.partition, high >= 0 and self.offsets.get((tp.topic, tp.partition),
                                                                       max(low, tp.offset)) >= high))
        return self.watermark.mark(parts, time.time())

    def step(self, events: list[Event]) -> None:
        """Score `events` (ts order), learning before each the labels due before it (join.py)."""
        now, held = time.time(), self.held.ids()
        due = self.join.due(events, held, now)
        if not due and not events:
            return
        stored = self.snapshots.fetch([e.event_id for e in events if self.maybe_scored(e)],
                                      [lb.event_id for lb in self.join.to_look_up(due, now)])
        learned: set[int] = set()
        for item in self.join.plan(events, due):
            if isinstance(item, Event):
                self.score(item, stored.get(item.event_id) or Snapshot())
            elif self.learn(item, stored):
                learned.add(id(item))
        self.join.settle(due, learned, stored, now)
        for lb in self.join.expire(now, held):
            self.dead_letter(lb.raw, lb.key, lb.partition, lb.offset, "unknown_event", f"no feature snapshot for event {lb.event_id!r} after "
                             f"{self.cfg.label_grace_s:g}s: the event is unknown, or its snapshot expired "
                             f"(snapshot_ttl_s={self.settings.features.snapshot_ttl_s})")

    def maybe_scored(self, event: Event) -> bool:
        """Perhaps scored before a restart? Then its stored prediction, made at event time, is kept."""
        return event.offset < self.rescore_below.get((event.topic, event.partition), 0)

    def catch_up(self) -> None:
        """After a crash: re-learn the labels whose outcomes were already published, in that order."""
        by_id = {lb.event_id: lb for lb in self.join.waiting}
        ready = []
        for event_id in self.replay:
            if event_id not in by_id:
                break
            ready.append(by_id[event_id])
        if not ready:
            return
        stored = self.snapshots.fetch((), [lb.event_id for lb in ready if lb.event_id not in self.join.recent])
        learned = set()
        for lb in ready:
            if not self.learn(lb, stored):
                break
            learned.add(id(lb))
            self.replay.popleft()
        self.join.settle([], learned, (), time.time())
        if not self.replay:
            log.info("learner %s: caught up after restart at position %d", self.name, self.position)

    def score(self, event: Event, stored: Snapshot) -> None:
        """Each model's prediction for one event, kept in memory for its label; one stored before a
        crash (made at event time) is kept and not published again."""
        fv = event.vector
        if fv.get("published_ms"):
            metrics.END_TO_END_SECONDS.observe(max(0.0, time.time() - fv["published_ms"] / 1000))
        answers = {s.role: stored.predictions[s.role] for s in self.roles.slots() if s.role in stored.predictions}
        blobs = {}
        for slot in self.roles.slots():
            if slot.role in answers:
                continue
            y_pred, proba = slot.score(fv["features"])
            p = {"event_id": event.event_id, "entity_id": fv["entity_id"], "ts": event.ts, "model": self.name,
                 "model_version": slot.version, "role": slot.role, "y_pred": y_pred, "proba": proba,
                 "source": SERVICE, "published_ms": fv.get("published_ms")}
            answers[slot.role] = p
            blobs[slot.role] = self.codec.encode("Prediction", p)
            self.produce(self.topics.predictions, blobs[slot.role], fv["entity_id"])
            self.telemetry.count("predictions", slot.role)
        if blobs:
            self.snapshots.queue_predictions_if_present(self.pipe, event.event_id, blobs, keep_existing=True)
        self.join.scored(event, Snapshot(fv, answers))

    def learn(self, label: Label, stored: dict[str, Snapshot]) -> bool:
        """Join a label with its event, emit outcomes, learn once. False = not ready (keeps waiting)."""
        snap = self.join.snapshot_for(label, stored, time.time())
        if snap is None:
            return False  # the event is still on its way through features (or to our scoring)
        if self.join.learned_before(label):
            metrics.DUPLICATES.labels(SERVICE, "labels.valid").inc()
            return True
        x = snap.vector["features"]
        learned = self.roles.learn(x, label.label, snap.predictions)
        for role, p in learned.answers:
            self.emit_outcome(snap.vector, label, p, role)
        for slot in self.roles.slots():
            self.telemetry.count("learned", slot.role)
        if self.join.learn(label):
            metrics.LABELS_OUT_OF_ORDER.labels(self.name).inc()
        if self.cfg.warm_start > 0:
            # With the champion's hit: a late challenger replays these test-then-train against it.
            self.buffer.append(json.dumps({"p": self.position, "x": x, "y": label.label,
                                           "h": learned.hits.get("champion"), "v": self.roles.champion.version}))
        self.position += 1
        self.since_checkpoint += 1
        self.since_update += 1
        self.dirty = True
        if learned.verdict == "promote":
            self.promote()
        elif learned.verdict == "drop":
            self.drop_challenger()
        return True

    def emit_outcome(self, fv: dict, label: Label, p: dict, role: str) -> None:
        if (label.event_id, role) in self.suppress:
            self.suppress.discard((label.event_id, role))
            return
        o = {"event_id": fv["event_id"], "entity_id": fv["entity_id"], "model": self.name,
             "model_version": p["model_version"], "role": role, "y_true": label.label, "y_pred": p["y_pred"],
             "proba": p["proba"], "position": self.position, "ts": fv["ts"],
             # what the offline store keeps (offline/rows.py): the vector scored, and where the label was read
             "features": fv["features"], "feature_set": fv.get("feature_set"), "label_ts": label.ts,
             "label_partition": label.partition, "label_offset": label.offset}
        self.produce(self.topics.outcomes, self.codec.encode("Outcome", o), fv["entity_id"])

    def dead_letter(self, raw: bytes | None, key, partition: int, offset: int, reason: str, detail: str) -> None:
        """A labels.valid message to labels.dlq."""
        self.produce(self.topics.labels_dlq, dead_letter(self.topics.labels_valid, reason, detail, SERVICE, key, raw,
                                                         partition, offset), key)
        metrics.DEAD_LETTERS.labels(SERVICE, "labels.valid", reason).inc()

    def undecodable(self, m: Message, exc: DecodeError) -> None:
        if m.topic() == self.topics.labels_valid:
            self.dead_letter(m.value(), m.key(), m.partition(), m.offset(), exc.reason, exc.detail)
        else:  # upstream services wrote it; there is no DLQ of theirs to put it in
            log.error("learner: undecodable %s message at %s/%s: %s", m.topic(), m.partition(), m.offset(), exc)
            metrics.DEAD_LETTERS.labels(SERVICE, base_topic(m.topic()), exc.reason).inc()

    def produce(self, topic: str, value: bytes, key: str | bytes | None = None) -> None:
        kafka.produce(self.producer, topic, value, key)
        self.telemetry.sent(topic)

    def flush_batch(self) -> None:
        if self.buffer:
            key = self.keys.example_buffer(self.name)
            self.pipe.lpush(key, *self.buffer)
            self.pipe.ltrim(key, 0, self.cfg.warm_start - 1)
            self.buffer = []
        started = time.perf_counter()
        self.pipe.execute()
        metrics.REDIS_SECONDS.labels(SERVICE, "write").observe(time.perf_counter() - started)
        self.pipe = None
        self.telemetry.export(self.roles)

    def tick(self) -> None:
        now = time.monotonic()
        if (self.join.waiting or self.held) and not self.replay and now >= self.next_retry:
            self.next_retry = now + 0.05  # labels past their hold, events whose labels are all in
            self.handle([])
        if self.replay and now > self.replay_deadline:
            log.error("learner %s: %d published outcomes never came back to be re-learned; giving up the "
                      "ordered replay (their labels will be learned as they come)", self.name, len(self.replay))
            self.replay.clear()
            self.handle([])
        if self.since_update and (self.since_update >= self.cfg.update_every
                                  or now - self.last_update >= self.cfg.update_interval_s):
            self.publish_update()
        if self.checkpoint_now or self.since_checkpoint >= self.cfg.checkpoint_every or (
                self.dirty and now - self.last_checkpoint >= self.cfg.checkpoint_interval_s):
            self.checkpoint()
        self.producer.poll(0)

    # -- control: retrain requests, swaps made elsewhere ------------------------------------------
    def start_challenger(self, req: dict) -> None:
        champion, challenger = self.roles.champion, self.roles.challenger
        asked_of = req.get("model_version")
        if req["reason"] != "demand" and asked_of is not None and asked_of != champion.version:
            # Drift seen in the errors of a champion that has been replaced since: the new one is
            # watched from scratch, and a challenger against it would be built on stale evidence.
            log.info("learner %s: retrain request %s (%s) about v%s ignored: v%d is the champion now", self.name,
                     req["request_id"], req["reason"], asked_of, champion.version)
            return
        if challenger is not None:
            log.info("learner %s: retrain request %s (%s) ignored: challenger v%d is still shadowing",
                     self.name, req["request_id"], req["reason"], challenger.version)
            self.lineage.ignored(challenger, req, self.position)
            return
        slot, contest = self.lineage.challenger(req, champion, self.position,
                                                self.warm_examples(req.get("since_position")))
        self.roles.start(slot, contest)
        log.info("learner %s: challenger v%d (%s, warm start %d, %d shadowed in replay) shadows champion v%d",
                 self.name, slot.version, req["reason"], slot.examples, contest.shared, champion.version)
        self.checkpoint_now = True
        if contest.verdict() == "promote":  # the replayed evidence is already conclusive
            self.promote()

    def warm_examples(self, since_position: int | None = None) -> list[tuple[dict, str, bool | None, int | None]]:
        """The last `warm_start` labelled examples, oldest first; with `since_position` (the drift's
        estimated change point) only those of the new regime: a tree warm-started on pre-drift
        examples first learns the concept it is meant to replace."""
        if self.cfg.warm_start <= 0:
            return []
        raw = self.r.lrange(self.keys.example_buffer(self.name), 0, self.cfg.warm_start - 1)
        pending = [json.loads(r) for r in self.buffer]  # learned in this batch, not pushed yet
        examples = ([json.loads(r) for r in reversed(raw)] + pending)[-self.cfg.warm_start:]  # oldest first
        since = since_position if since_position is not None else -1
        return [(e["x"], e["y"], e.get("h"), e.get("v")) for e in examples if since <= e["p"] < self.position]

    def promote(self) -> None:
        evidence = self.roles.contest.evidence()
        self.telemetry.retire(self.roles.champion, self.roles.challenger)
        old, new = self.roles.promote()
        self.lineage.promoted(old, new, evidence, self.position)
        log.info("learner %s: PROMOTED v%d over v%d at position %d (%s)", self.name, new.version, old.version,
                 self.position, evidence)
        self.checkpoint_now = True

    def drop_challenger(self) -> None:
        evidence = self.roles.contest.evidence()
        self.telemetry.retire(self.roles.challenger)
        slot = self.roles.drop()
        self.lineage.dropped(slot, evidence, self.position)
        metrics.CHALLENGERS_DROPPED.labels(self.name).inc()
        log.info("learner %s: challenger v%d dropped at position %d (%s)", self.name, slot.version, self.position,
                 evidence)
        self.checkpoint_now = True

    def follow_swap(self, swap: dict) -> None:
        """A champion change published elsewhere (a rollback or a manual promotion through the
        prediction service or our admin route): adopt it when the registry agrees."""
        new = self.lineage.followed(swap, self.roles.champion, self.roles.challenger)
        if new is None:
            return
        if new is self.roles.challenger:
            self.telemetry.retire(new)
        old = self.roles.replace_champion(new, Contest.from_settings(self.cfg))
        self.lineage.save(old)
        self.telemetry.retire(old)
        log.info("learner %s: champion is now v%d (%s, from v%s)", self.name, new.version, swap["reason"], old.version)
        self.checkpoint_now = True

    # -- registry, model.updates, model.swaps ------------------------------------------------------
    def publish_swap(self, from_version: int | None, to_version: int, reason: str) -> None:
        publish_swap(self.producer, self.topics, model=self.name, from_version=from_version, to_version=to_version,
                     reason=reason, position=self.position, service=SERVICE)

    def publish_update(self) -> None:
        slot = self.roles.champion
        slot.revision = self.lineage.save(slot, offsets={f"{self.topics.base(t)}/{p}": o
                                                         for (t, p), o in sorted(self.offsets.items())})
        update = {"model": self.name, "version": slot.version, "examples_seen": slot.examples,
                  "revision": slot.revision, "ts": time.time()}
        self.produce(self.topics.model_updates, self.codec.encode("ModelUpdate", update), self.name)
        metrics.MODEL_UPDATES.labels(self.name).inc()
        self.since_update = 0
        self.last_update = time.monotonic()

    # -- checkpoint and restore --------------------------------------------------------------------
    def checkpoint(self, force: bool = False) -> bool:
        if self.replay or self.roles is None:
            return False  # mid-recovery: offsets are ahead of what has been applied
        if not (force or self.dirty or self.checkpoint_now):
            return False
        if self.producer.flush(30) > 0:
            log.error("learner %s: producer did not flush; checkpoint postponed", self.name)
            return False
        state = LearnerState(self.cfg.model, self.roles, dict(self.offsets),
                             high_watermark(self.consumer, self.topics.outcomes), self.join.waiting, self.position,
                             self.join.clock, self.held.events, self.held_control, self.watermark.ts_by_partition)
        if not save_checkpoint(self.r, self.keys, self.name, self.lease, state, self.signing_key):
            log.error("learner %s: lease lost; checkpoint refused", self.name)
            return False
        metrics.CHECKPOINTS.labels(self.name).inc()
        try:  # for lag tools only (kafka-consumer-groups, the replay's stall report): never read back
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in self.offsets.items()],
                                 asynchronous=True)
        except Exception:
            log.debug("offset commit for lag tools failed", exc_info=True)
        self.dirty = self.checkpoint_now = False
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        return True

    def restore(self) -> None:
        state = load_checkpoint(self.r, self.keys, self.name, self.signing_key)  # TamperedArtifact: refuse loudly
        self.reset_session(state)
        if state is None:
            self.roles = Roles(self.lineage.first_champion())
            self.r.delete(self.keys.example_buffer(self.name))
            self.checkpoint_now = True
            return
        self.trim_example_buffer()
        published = outcomes_since(self.settings, self.topics.outcomes, state.outcomes_offset, self.name)
        self.suppress = {(o["event_id"], o["role"]) for o in published}
        self.replay = deque(o["event_id"] for o in published if o["role"] == "champion")
        self.replay_deadline = time.monotonic() + self.cfg.label_grace_s + 30
        challenger = self.roles.challenger
        log.info("learner %s: restored checkpoint at position %d (champion v%d, challenger %s); %d outcomes "
                 "published since will be re-learned without publishing them again", self.name, self.position,
                 self.roles.champion.version, f"v{challenger.version}" if challenger else "none", len(self.replay))
        self.telemetry.versions(self.roles)

    def trim_example_buffer(self) -> None:
        """Drop buffered examples learned after the checkpoint: they are about to be learned again."""
        key = self.keys.example_buffer(self.name)
        while True:
            head = self.r.lindex(key, 0)
            if head is None or json.loads(head)["p"] < self.position:
                return
            self.r.lpop(key)

    # -- introspection ---------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {**super().health(), **self.status()}

    def status(self) -> dict[str, Any]:
        roles = self.roles

        def slot(s: Slot | None):
            return None if s is None else {"version": s.version, "examples": s.examples, **s.stats.as_dict()}

        return {"state": self.state, "model": self.name, "position": self.position,
                "waiting_labels": len(self.join.waiting), "champion": slot(roles.champion if roles else None),
                "challenger": slot(roles.challenger if roles else None),
                "contest": roles.contest.evidence() if roles and roles.contest else None}
