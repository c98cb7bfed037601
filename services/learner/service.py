"""The learner: scores every event with the champion (and challenger), learns once from every label.

    driftline serve learner          # port settings.ports.learner; GET /health, /metrics, /v1/models

One active learner per model name holds a Redis lease; another instance waits as a standby and
takes over from the last checkpoint when the active one stops renewing. The active learner reads
all partitions of `features`, `labels.valid`, `retrain.requests` and `model.swaps` from the offsets
of its checkpoint (never group-managed offsets: the checkpoint *is* the commit), and per batch:

    decode -> control (retrain, swaps) -> events wait for the labels older than them, labels for
    the events older than them (Kafka does not order two topics) -> walk the events in ts order:
    learn the labels due before each one (join with the event's `fv` and `p.<role>`, from memory or
    its Redis snapshot), then score it -> one Redis pipeline + produce -> checkpoint every N labels
    / T seconds

A retrain request builds a challenger warm-started on the labels since the drift's change point,
replayed test-then-train against the champion's recorded answers, so the contest (champion.py)
has its evidence at once however late the request came; it may promote on the spot.

It must never learn a label twice nor skip one: offsets, models, waiting labels and counters are
checkpointed together, and after a crash the outcomes already published since the checkpoint are
read back so that those labels are re-learned in the same order without being published again.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

import redis
from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition
from fastapi import Body, Header, HTTPException

from driftline.shared import deps, kafka, metrics
from driftline.shared.codec import DecodeError, get_codec
from driftline.shared.kafka import base_topic
from driftline.shared.keys import Keys
from driftline.shared.registry import ModelRegistry, TamperedArtifact, UnknownVersion
from driftline.shared.runtime import StreamWorker, configure_logging, run_app, service_app
from driftline.shared.settings import Settings
from driftline.shared.topics import Topics

from .champion import Contest, Slot, predict
from .labels import to_river
from .checkpoint import Lease, high_watermark, load_checkpoint, outcomes_since, save_checkpoint
from .prequential import Prequential
from .spec import describe, parse_model

log = logging.getLogger(__name__)
SERVICE = "learner"
MAX_HELD_EVENTS = 50_000  # events held for their older labels, at most
EVENT_PATIENCE_S = 10.0  # an event waits this long at most for labels.valid to catch up
RECENT_EVENTS = 50_000  # scored events kept in memory for their labels (older: read from Redis)

# Write fields into an event's snapshot only while it exists (never recreate an expired one without
# its TTL). ARGV[1] = 'nx' keeps a prediction made earlier (at event time) over a re-scored one.
_SNAP_SET = """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
for i = 2, #ARGV, 2 do
  if ARGV[1] == 'nx' then redis.call('hsetnx', KEYS[1], ARGV[i], ARGV[i + 1])
  else redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""


class LearnerWorker(StreamWorker):
    service = SERVICE
    batch_size = 1000
    poll_timeout_s = 0.05

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.control = None  # the control-plane consumer (retrain.requests, model.swaps)
        self.cfg = settings.learner
        self.name = self.cfg.model_name
        self.spec = self.cfg.model
        self.keys = Keys(settings.namespace)
        self.codec = get_codec()
        self.r = deps.redis_client(settings)  # waits out a Redis outage
        self.signing_key = settings.model_key.get_secret_value().encode()
        self.registry = ModelRegistry(self.r, self.keys, self.name, self.signing_key)
        self.lease = Lease(self.r, self.keys.lease(self.name), self.cfg.lease_ttl_s)
        self._snap_set = self.r.register_script(_SNAP_SET)
        self.hold_s = settings.features.max_reorder_wait_ms / 1000
        self.patience = max(5 * self.hold_s, self.cfg.label_grace_s / 3)
        self.state = "standby"
        self._out: dict[str, Any] = {}
        self.reset_session()

    # -- session state: everything a checkpoint holds, plus recovery bookkeeping ---------------
    def reset_session(self) -> None:
        self.champion: Slot | None = None
        self.challenger: Slot | None = None
        self.contest: Contest | None = None
        self.offsets: dict[tuple[str, int], int] = {}
        self.waiting: list[dict] = []  # labels consumed, not yet learned (arrival order)
        self.position = 0  # champion labels learned so far
        self.clock = float("-inf")  # event time of the latest scored event
        self.outcomes_offset = 0
        self.sid = uuid.uuid4().hex[:12]
        self.base_position = 0
        self.replay: deque[str] = deque()  # labels to re-learn first, in their published order
        self.suppress: set[tuple[str, str]] = set()  # (event_id, role) outcomes already published
        self.held_features: list[dict] = []  # events read, not yet scored (waiting for older labels)
        self.label_clock = float("-inf")  # latest label ts read
        self.label_ts_by_partition: dict[int, float] = {}  # latest label ts read, per labels.valid partition
        self.label_partitions: list[TopicPartition] = []
        self.label_seen_at: dict[int, float] = {}  # wall time of the latest label read, per partition
        self.features_arrived_at = 0.0  # wall time of the latest features message read
        self.features_resumed_at = 0.0  # when features came back after a quiet spell (or first came)
        self.held_control: list[tuple[str, dict]] = []
        self.replay_deadline = 0.0
        self.dirty = False
        self.checkpoint_now = False
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.since_update = 0
        self.last_update = time.monotonic()
        self.next_retry = 0.0
        self.last_feature_at = 0.0
        self.warned_patience = 0.0
        self.learned_ts = float("-inf")  # latest label ts learned: the order check
        self.recent: OrderedDict[str, dict] = OrderedDict()  # scored events whose label has not come
        self.learned_ids: OrderedDict[str, None] = OrderedDict()  # to drop a label delivered twice
        self.rescore_below: dict[tuple[str, int], int] = {}  # offsets consumed before this session
        self.buffer: list[str] = []  # examples for the warm-start buffer, pushed once per batch
        self.pipe = None

    def produce(self, topic: str, value: bytes, key: str | bytes | None = None) -> None:
        kafka.produce(self.producer, topic, value, key)
        counter = self._out.get(topic)
        if counter is None:  # label lookups cost more than the produce itself; do them once
            counter = self._out[topic] = metrics.MESSAGES_OUT.labels(SERVICE, base_topic(topic))
        counter.inc()

    def input_topics(self) -> list[str]:
        t = self.topics
        return [t.features, t.labels_valid]

    def control_topics(self) -> list[str]:
        # Read by a consumer of their own: in one consumer, librdkafka's prefetch queue would put a
        # retrain request behind megabytes of backlog, and the challenger would start after the
        # stream it should adapt to has passed.
        t = self.topics
        return [t.retrain_requests, t.model_swaps]

    # -- the lease loop: standby until it holds the lease, then one active session -------------
    def run(self) -> None:
        while not self._stop.is_set():
            if self.lease.try_acquire():
                log.info("learner %s: lease taken, active", self.name)
                try:
                    self.session()
                except BaseException:
                    self.lease.release()  # let a standby try; this process reports the error on /health
                    raise
                finally:
                    self.state = "standby"
            else:
                self._stop.wait(min(1.0, self.cfg.lease_ttl_s / 4))

    def session(self) -> None:
        self.reset_session()
        self.restore()
        self.consumer = self.open_consumer(self.input_topics())
        self.control = self.open_consumer(self.control_topics())
        self.state = "active"
        try:
            while not self._stop.is_set() and not self.lease.lost.is_set():
                control = self.control.consume(num_messages=100, timeout=0)
                messages = self.consumer.consume(num_messages=self.batch_size, timeout=self.poll_timeout_s)
                good = [m for m in control + messages if m.error() is None]
                if good:
                    self._count_in(good)
                    started = time.perf_counter()
                    self.handle(good)
                    metrics.PROCESSING_SECONDS.labels(SERVICE, "batch").observe(time.perf_counter() - started)
                    metrics.BATCH_SIZE.labels(SERVICE).observe(len(good))
                    self.batches += 1
                self.tick()
                self._export_lag()
            if self.lease.lost.is_set():
                log.error("learner %s: lease lost; stopping without a checkpoint", self.name)
            else:
                self.checkpoint(force=True)
                self.lease.release()
        finally:
            self.producer.flush(10)
            self.consumer.close()
            self.control.close()
            self.consumer = self.control = None

    def open_consumer(self, topics: list[str]):
        # The group id is the service's (lag tools read its offsets); the learner's position is the
        # checkpoint's, never the group's.
        c = kafka.consumer(self.settings, self.topics.group(SERVICE))
        parts = []
        for topic in topics:
            for tp in kafka.partitions_of(self.settings, topic):
                offset = self.offsets.get((topic, tp.partition), OFFSET_BEGINNING)
                parts.append(TopicPartition(topic, tp.partition, offset))
                if topic == self.topics.features:  # events up to here may have been scored before
                    _low, high = c.get_watermark_offsets(tp, timeout=10.0, cached=False)
                    self.rescore_below[(topic, tp.partition)] = high
        c.assign(parts)
        if self.topics.labels_valid in topics:
            self.label_partitions = [tp for tp in parts if tp.topic == self.topics.labels_valid]
        return c

    def handle(self, messages: list[Message]) -> None:
        features, labels, control = self.decode(messages)
        self.waiting.extend(labels)
        now = time.time()
        if features:
            if now - self.features_arrived_at >= self.cfg.label_idle_s:
                self.features_resumed_at = now  # a stream (re)starts: its labels get time to show up
            self.features_arrived_at = now
        self.label_clock = max([self.label_clock] + [lb["ts"] for lb in labels])
        for lb in labels:
            part = lb["_part"]
            self.label_ts_by_partition[part] = max(self.label_ts_by_partition.get(part, lb["ts"]), lb["ts"])
            self.label_seen_at[part] = now
        self.held_features.extend(features)
        self.held_control.extend(control)
        self.pipe = self.r.pipeline(transaction=False)
        if self.replay:
            self.catch_up()
        if not self.replay:
            # Control first: a retrain request read now must not wait for the batch's hundreds of
            # examples (the old champion would go on answering them).
            control, self.held_control = self.held_control, []
            for kind, value in control:
                self.on_control(kind, value)
            self.step(self.release_features())
        self.flush_batch()

    def release_features(self) -> list[dict]:
        """The held events that may be scored now, in ts order: those whose labels-so-far are all
        in (a label at or after their ts has been read, or labels.valid is read to its end), so
        that an event is never scored by a model missing a label older than it. Kafka does not
        order two topics; without this a backlog of events would be scored before its labels."""
        if not self.held_features:
            return []
        held = sorted(self.held_features, key=lambda f: f["ts"])
        now = time.time()
        watermark = self.label_watermark()
        if watermark == float("inf"):
            cut = len(held)
        else:
            cut = 0
            while cut < len(held) and (held[cut]["ts"] <= watermark
                                          or now - held[cut]["_seen"] >= EVENT_PATIENCE_S):
                cut += 1
            cut = max(cut, len(held) - MAX_HELD_EVENTS)  # bounded memory: the oldest go anyway
            if cut and held[cut - 1]["ts"] > watermark and now - self.warned_patience >= 60:
                self.warned_patience = now  # once a minute: it says labels.valid lags, not a per-event fault
                log.warning("learner %s: %d events scored before older labels arrived (labels.valid is more "
                            "than %gs behind features): learning order now follows arrival", self.name, cut,
                            EVENT_PATIENCE_S)
        self.held_features = held[cut:]
        return held[:cut]

    def label_watermark(self) -> float:
        """Event time up to which every labels.valid partition has been read. The min over
        partitions, not the max: a fast partition must not release events while a slow one still
        holds older labels, or learning would follow fetch timing instead of the stream's order.

        A partition read to its end counts as +inf only once it has also been *idle*: no label
        from it for `label_idle_s`, counted from when the features stream (re)started. Being at
        the end alone proves nothing while labels are still on their way through ingestion (at a
        replay's start they trail the events by seconds), and is true for a moment after every
        fetch. This is Flink's source idleness, for the same reason."""
        mark = float("inf")
        now = time.time()
        for tp in self.label_partitions:
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            at_end = high >= 0 and self.offsets.get((tp.topic, tp.partition), max(low, tp.offset)) >= high
            quiet_since = max(self.label_seen_at.get(tp.partition, 0.0), self.features_resumed_at)
            if at_end and now - quiet_since >= self.cfg.label_idle_s:
                continue
            mark = min(mark, self.label_ts_by_partition.get(tp.partition, float("-inf")))
        return mark

    def tick(self) -> None:
        now = time.monotonic()
        if (self.waiting or self.held_features) and not self.replay and now >= self.next_retry:
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

    # -- decode ------------------------------------------------------------------------------
    def decode(self, messages: list[Message]) -> tuple[list[dict], list[dict], list[tuple[str, dict]]]:
        features, labels, control = [], [], []
        now = time.time()
        for m in messages:
            topic = base_topic(m.topic())
            self.offsets[(m.topic(), m.partition())] = m.offset() + 1
            self.dirty = True
            try:
                if topic == "features":
                    fv = self.codec.decode(m.value(), expect="FeatureVector")
                    fv.update(_tp=(m.topic(), m.partition()), _offset=m.offset(), _seen=now)
                    features.append(fv)
                elif topic == "labels.valid":
                    label = self.codec.decode(m.value(), expect="Label")
                    label.update(_seen=now, _raw=m.value(), _key=m.key(), _part=m.partition(), _off=m.offset())
                    labels.append(label)
                elif topic == "retrain.requests":
                    control.append(("retrain", self.codec.decode(m.value(), expect="RetrainRequest")))
                elif topic == "model.swaps":
                    control.append(("swap", self.codec.decode(m.value(), expect="ModelSwap")))
            except DecodeError as exc:
                if topic == "labels.valid":
                    self.dead_letter(m.value(), m.key(), m.partition(), m.offset(), exc.reason, exc.detail)
                else:  # upstream services wrote it; there is no DLQ of theirs to put it in
                    log.error("learner: undecodable %s message at %s/%s: %s", topic, m.partition(), m.offset(), exc)
                    metrics.DEAD_LETTERS.labels(SERVICE, topic, exc.reason).inc()
        return features, labels, control

    # -- the one thing: learn the labels due, score the events, in event-time order ---------------
    def step(self, features: list[dict]) -> None:
        """Walk `features` (sorted by ts); before scoring each, learn the waiting labels whose ts is
        not after it (the replay's point-in-time rule); after the walk, labels that waited past
        the hold are learned too. Labels whose event has no snapshot (or no prediction of ours)
        yet keep waiting."""
        horizon = max([self.clock] + [f["ts"] for f in features])
        now = time.time()
        if features:
            self.last_feature_at = now
        # A label later than every event seen waits for the events before it; it is released early
        # only when the features stream has been quiet for the hold (the end of a replay, an idle
        # hour), or after a third of the grace (a producer whose label clock runs ahead).
        idle = now - self.last_feature_at >= self.hold_s
        # A label whose ts runs ahead of its (already scored) event waits a third of the grace at
        # most. One whose event has not been scored waits for it while the features stream flows:
        # behind a features backlog its vector may be many seconds away, and re-reading every such
        # label from Redis on every batch would only deepen the backlog.
        held = {f["event_id"] for f in self.held_features}  # their labels wait for them, however long
        due = [lb for lb in self.waiting if lb["event_id"] not in held and (
            lb["ts"] <= horizon or (idle and now - lb["_seen"] >= self.hold_s)
            or (lb["event_id"] in self.recent and now - lb["_seen"] >= self.patience) or self.overdue(lb, now))]
        if not due and not features:
            return
        stored = self.fetch([f for f in features if self.maybe_scored(f)],
                            [lb for lb in due if lb["event_id"] not in self.recent and lb.get("_retry", 0) <= now])
        due.sort(key=lambda lb: lb["ts"])
        learned: set[int] = set()
        i = 0
        for f in features:
            while i < len(due) and due[i]["ts"] <= f["ts"]:
                if self.learn(due[i], stored):
                    learned.add(id(due[i]))
                i += 1
            self.score(f, stored.get(f["event_id"], {}))
            self.clock = max(self.clock, f["ts"])
        for lb in due[i:]:
            if self.learn(lb, stored):
                learned.add(id(lb))
        for lb in due:
            if id(lb) not in learned and lb["event_id"] in stored:
                lb["_retry"] = now + 0.5  # looked it up in Redis and it was not there: not again at once
        self.waiting = [lb for lb in self.waiting if id(lb) not in learned]
        self.expire_waiting(now, held)

    def maybe_scored(self, fv: dict) -> bool:
        """Was this event perhaps scored already (by the learner before a restart)? Then its stored
        prediction, made at event time, is kept."""
        return fv["_offset"] < self.rescore_below.get(fv["_tp"], 0)

    def catch_up(self) -> None:
        """After a crash: re-learn the labels whose outcomes were already published, in that order."""
        by_id = {lb["event_id"]: lb for lb in self.waiting}
        ready = []
        for event_id in self.replay:
            if event_id not in by_id:
                break
            ready.append(by_id[event_id])
        if not ready:
            return
        stored = self.fetch([], [lb for lb in ready if lb["event_id"] not in self.recent])
        learned = set()
        for lb in ready:
            if not self.learn(lb, stored):
                break
            learned.add(id(lb))
            self.replay.popleft()
        self.waiting = [lb for lb in self.waiting if id(lb) not in learned]
        if not self.replay:
            log.info("learner %s: caught up after restart at position %d", self.name, self.position)

    def fetch(self, features: list[dict], labels: list[dict]) -> dict[str, dict]:
        """Snapshots from Redis in one pipelined round trip: the stored predictions of events that
        may have been scored before, `fv` + predictions of labelled events we do not hold in memory."""
        pipe = self.r.pipeline(transaction=False)
        ids = []
        for f in features:
            pipe.hmget(self.keys.snapshot(f["event_id"]), "p.champion", "p.challenger")
            ids.append(f["event_id"])
        for lb in labels:
            pipe.hmget(self.keys.snapshot(lb["event_id"]), "p.champion", "p.challenger", "fv")
            ids.append(lb["event_id"])
        if not ids:
            return {}
        started = time.perf_counter()
        results = pipe.execute()
        metrics.REDIS_SECONDS.labels(SERVICE, "fetch").observe(time.perf_counter() - started)
        snaps: dict[str, dict] = {}
        for event_id, values in zip(ids, results):
            snap = snaps.setdefault(event_id, {})
            for field, raw in zip(("p.champion", "p.challenger", "fv"), values):
                if raw is None:
                    continue
                try:
                    snap[field] = self.codec.decode(raw, expect="FeatureVector" if field == "fv" else "Prediction")
                except DecodeError as exc:
                    log.error("learner: snapshot %s field %s does not decode: %s", event_id, field, exc)
        return snaps

    def score(self, fv: dict, stored: dict) -> None:
        """Predictions for one event by each model, kept in memory for its label; a prediction
        already stored (made at event time before a crash) is kept and not published again."""
        out: dict[str, Any] = {"fv": fv}
        fields: list[str] = []
        if fv.get("published_ms"):
            metrics.END_TO_END_SECONDS.observe(max(0.0, time.time() - fv["published_ms"] / 1000))
        for slot in (self.champion, self.challenger):
            if slot is None:
                continue
            field = f"p.{slot.role}"
            if field in stored:
                out[field] = stored[field]
                continue
            y_pred, proba = slot.score(fv["features"])
            p = {"event_id": fv["event_id"], "entity_id": fv["entity_id"], "ts": fv["ts"], "model": self.name,
                 "model_version": slot.version, "role": slot.role, "y_pred": y_pred, "proba": proba,
                 "source": SERVICE, "published_ms": fv.get("published_ms")}
            blob = self.codec.encode("Prediction", p)
            out[field] = p
            fields += [field, blob]
            self.produce(self.topics.predictions, blob, fv["entity_id"])
            self.count("predictions", slot.role)
        if fields:
            self._snap_set(keys=[self.keys.snapshot(fv["event_id"])], args=["nx", *fields], client=self.pipe)
        self.recent[fv["event_id"]] = out
        while len(self.recent) > RECENT_EVENTS:
            self.recent.popitem(last=False)  # older ones are read back from their snapshot

    def learn(self, label: dict, stored: dict) -> bool:
        """Join a label with its event, emit outcomes, learn once. False = not ready (keeps waiting)."""
        event_id = label["event_id"]
        snap = self.recent.get(event_id) or stored.get(event_id, {})
        fv = snap.get("fv")
        if fv is None or ("p.champion" not in snap and not self.overdue(label, time.time())):
            return False  # the event is still on its way through features (or to our scoring)
        if event_id in self.learned_ids:
            metrics.DUPLICATES.labels(SERVICE, "labels.valid").inc()
            return True
        x, y_true = fv["features"], label["label"]
        if label["ts"] < self.learned_ts:
            metrics.LABELS_OUT_OF_ORDER.labels(self.name).inc()
        self.learned_ts = max(self.learned_ts, label["ts"])
        results = {}
        for slot in (self.champion, self.challenger):
            if slot is None:
                continue
            p = snap.get(f"p.{slot.role}")
            if p is None and slot.role == "champion":  # grace is over: score now, before learning
                y_pred, proba = slot.score(x)
                p = {"model_version": slot.version, "y_pred": y_pred, "proba": proba}
            if p is not None and p["model_version"] == slot.version:
                results[slot.role] = slot.stats.update(y_true, p["y_pred"], p["proba"])
            if p is not None and (slot.role == "champion" or p["model_version"] == slot.version):
                self.emit_outcome(fv, label, p, slot.role)
        for slot in (self.champion, self.challenger):
            if slot is not None:
                slot.learn(x, y_true)
                self.count("learned", slot.role)
        self.recent.pop(event_id, None)
        self.learned_ids[event_id] = None
        if len(self.learned_ids) > RECENT_EVENTS:
            self.learned_ids.popitem(last=False)
        if self.cfg.warm_start > 0:
            # With the champion's hit: a late challenger replays these test-then-train against it.
            self.buffer.append(json.dumps({"p": self.position, "x": x, "y": y_true, "h": results.get("champion"),
                                           "v": self.champion.version}))
        self.position += 1
        self.since_checkpoint += 1
        self.since_update += 1
        self.dirty = True
        if self.contest is not None and len(results) == 2:
            self.contest.record(results["champion"], results["challenger"])
            verdict = self.contest.verdict()
            if verdict == "promote":
                self.promote()
            elif verdict == "drop":
                self.drop_challenger()
        return True

    def count(self, what: str, role: str) -> None:
        child = self._out.get((what, role))
        if child is None:
            metric = metrics.PREDICTIONS.labels(SERVICE, self.name, role) if what == "predictions" \
                else metrics.EXAMPLES_LEARNED.labels(self.name, role)
            child = self._out[(what, role)] = metric
        child.inc()

    def emit_outcome(self, fv: dict, label: dict, p: dict, role: str) -> None:
        if (fv["event_id"], role) in self.suppress:
            self.suppress.discard((fv["event_id"], role))
            return
        o = {"event_id": fv["event_id"], "entity_id": fv["entity_id"], "model": self.name,
             "model_version": p["model_version"], "role": role, "y_true": label["label"], "y_pred": p["y_pred"],
             "proba": p["proba"], "position": self.position, "ts": fv["ts"]}
        self.produce(self.topics.outcomes, self.codec.encode("Outcome", o), fv["entity_id"])

    def overdue(self, label: dict, now: float) -> bool:
        """Has this label waited its grace *and* could its event no longer be on its way? Wall time
        alone is no proof: behind a features backlog the event's vector may be minutes away. Only
        once the features stream has gone quiet for as long, or event time on it has moved past the
        label's own ts by the grace (its event, older than the label, would have been scored by
        then), does the label stop waiting: learned from the event's snapshot, scored now, if
        Redis has it, dead-lettered if not."""
        grace = self.cfg.label_grace_s
        return now - label["_seen"] >= grace and (now - self.last_feature_at >= grace
                                                  or self.clock >= label["ts"] + grace)

    def expire_waiting(self, now: float, held: set[str]) -> None:
        """Dead-letter the overdue labels; those of `held` events (here, waiting for older labels)
        are not lost."""
        keep = []
        for lb in self.waiting:
            if lb["event_id"] not in held and self.overdue(lb, now):
                self.dead_letter(lb["_raw"], lb["_key"], lb["_part"], lb["_off"], "unknown_event",
                                 f"no feature snapshot for event {lb['event_id']!r} after {self.cfg.label_grace_s:g}s: "
                                 f"the event is unknown, or its snapshot expired "
                                 f"(snapshot_ttl_s={self.settings.features.snapshot_ttl_s})")
            else:
                keep.append(lb)
        self.waiting = keep

    def dead_letter(self, payload: bytes, key, partition: int, offset: int, reason: str, detail: str) -> None:
        record = {"source_topic": "labels.valid", "reason": reason, "detail": detail, "service": SERVICE,
                  "key": key if isinstance(key, bytes) or key is None else str(key).encode(),
                  "payload": payload or b"", "partition": partition, "offset": offset, "ts": time.time()}
        self.produce(self.topics.labels_dlq, self.codec.encode("DeadLetter", record), key)
        metrics.DEAD_LETTERS.labels(SERVICE, "labels.valid", reason).inc()

    def flush_batch(self) -> None:
        if self.pipe is None:
            return
        if self.buffer:
            key = self.keys.example_buffer(self.name)
            self.pipe.lpush(key, *self.buffer)
            self.pipe.ltrim(key, 0, self.cfg.warm_start - 1)
            self.buffer = []
        started = time.perf_counter()
        self.pipe.execute()
        metrics.REDIS_SECONDS.labels(SERVICE, "write").observe(time.perf_counter() - started)
        self.pipe = None
        self.export_stats()

    # -- control: retrain requests, swaps made elsewhere -------------------------------------------
    def on_control(self, kind: str, value: dict) -> None:
        if value.get("model") != self.name:
            return
        if kind == "retrain":
            self.start_challenger(value)
        else:
            self.follow_swap(value)

    def start_challenger(self, req: dict) -> None:
        asked_of = req.get("model_version")
        if req["reason"] != "demand" and asked_of is not None and asked_of != self.champion.version:
            # Drift seen in the errors of a champion that has been replaced since: the new one is
            # watched from scratch, and a challenger against it would be built on stale evidence.
            log.info("learner %s: retrain request %s (%s) about v%s ignored: v%d is the champion now", self.name,
                     req["request_id"], req["reason"], asked_of, self.champion.version)
            return
        if self.challenger is not None:
            log.info("learner %s: retrain request %s (%s) ignored: challenger v%d is still shadowing",
                     self.name, req["request_id"], req["reason"], self.challenger.version)
            meta = self.registry.meta(self.challenger.version)
            ignored = meta.get("ignored_requests", []) + [{"request_id": req["request_id"], "reason": req["reason"],
                                                           "position": self.position}]
            self.registry.annotate(self.challenger.version, ignored_requests=ignored[-50:])
            return
        version = next((m["version"] for m in self.registry.versions() if m.get("request_id") == req["request_id"]),
                       None)
        if version is not None:  # registered by a learner that crashed before its checkpoint
            model, meta = self.registry.load(version)
            examples = int(meta.get("examples_seen", 0))
            contest = Contest.from_settings(self.cfg)  # its warm-up record was not kept: start afresh
        else:
            model = parse_model(self.spec)
            warm = self.warm_examples(req.get("since_position"))
            contest = Contest.from_settings(self.cfg)
            for x, y, champion_hit, version_then in warm:
                # Test-then-train, as if the challenger had shadowed since the change point: the
                # request reaches us a batch or more after the drift, and this way that delay costs
                # no evidence, only the examples the old champion answered meanwhile.
                if champion_hit is not None and version_then == self.champion.version:  # this champion's answers only
                    contest.record(champion_hit, predict(model, x) == y)
                model.learn_one(x, to_river(y))
            examples = len(warm)
            version = self.registry.register(
                model, spec=self.spec, reason=req["reason"], parent=self.champion.version, drift_id=req.get("drift_id"),
                examples_seen=examples, position=self.position)
            self.registry.annotate(version, request_id=req["request_id"], warm_start=examples,
                                   requested_at=req.get("position"))
        self.registry.set_role("challenger", version)
        self.challenger = Slot("challenger", version, model, Prequential(self.cfg.window), examples=examples)
        self.contest = contest
        log.info("learner %s: challenger v%d (%s, warm start %d, %d shadowed in replay) shadows champion v%d",
                 self.name, version, req["reason"], examples, contest.shared, self.champion.version)
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
        old, new = self.champion, self.challenger
        evidence = self.contest.evidence()
        self.retire_gauges(old)
        self.retire_gauges(new)
        old.revision = self.registry.update(old.version, old.model, examples_seen=old.examples,
                                            metrics=old.stats.as_dict())
        new.revision = self.registry.update(new.version, new.model, examples_seen=new.examples,
                                            metrics=new.stats.as_dict())
        already = self.registry.champion() == new.version  # a crashed learner promoted it already
        self.registry.set_role("champion", new.version)
        self.registry.set_role("challenger", None)
        self.registry.annotate(new.version, promoted_at=self.position, replaced=old.version, contest=evidence)
        self.registry.annotate(old.version, retired_at=self.position, retired_by=new.version)
        new.role = "champion"
        self.champion, self.challenger, self.contest = new, None, None
        if not already:
            self.publish_swap(old.version, new.version, "promotion")
        log.info("learner %s: PROMOTED v%d over v%d at position %d (%s)", self.name, new.version, old.version,
                 self.position, evidence)
        self.checkpoint_now = True

    def drop_challenger(self) -> None:
        slot, evidence = self.challenger, self.contest.evidence()
        self.retire_gauges(slot)
        self.registry.annotate(slot.version, dropped_at=self.position, contest=evidence,
                               drop_reason=f"did not beat the champion ({self.cfg.promotion_rule}, margin "
                                           f"{self.cfg.promote_margin:g}) within {self.cfg.max_shadow} shared "
                                           f"examples",
                               metrics=slot.stats.as_dict())
        self.registry.set_role("challenger", None)
        self.challenger, self.contest = None, None
        metrics.CHALLENGERS_DROPPED.labels(self.name).inc()
        log.info("learner %s: challenger v%d dropped at position %d (%s)", self.name, slot.version, self.position,
                 evidence)
        self.checkpoint_now = True

    def follow_swap(self, swap: dict) -> None:
        """A champion change published elsewhere (a rollback or a manual promotion through the
        prediction service or our admin route): adopt it when the registry agrees."""
        target = swap["to_version"]
        if target == self.champion.version or self.registry.champion() != target:
            return  # ours, or already superseded by a later change
        if self.challenger is not None and self.challenger.version == target:
            if swap["reason"] == "promotion":
                return  # our own promotion, lost in a crash: the replay will make it again
            self.retire_gauges(self.challenger)
            new = self.challenger
            new.role = "champion"
            self.challenger, self.contest = None, None
            self.registry.set_role("challenger", None)
        else:
            try:
                model, meta = self.registry.load(target)
            except (TamperedArtifact, UnknownVersion) as exc:
                log.error("learner %s: REFUSED to follow the swap to v%s: %r; keeping v%d", self.name, target, exc,
                          self.champion.version)
                return
            new = Slot("champion", target, model, Prequential(self.cfg.window),
                       examples=int(meta.get("examples_seen", 0)), revision=int(meta.get("revision", 0)))
            if self.contest is not None:  # compare the challenger with the new champion from scratch
                self.contest = Contest.from_settings(self.cfg)
        old = self.champion
        self.registry.update(old.version, old.model, examples_seen=old.examples, metrics=old.stats.as_dict())
        self.retire_gauges(old)
        self.champion = new
        log.info("learner %s: champion is now v%d (%s, from v%s)", self.name, target, swap["reason"], old.version)
        self.checkpoint_now = True

    # -- registry, model.updates, model.swaps --------------------------------------------------
    def publish_swap(self, from_version: int | None, to_version: int, reason: str) -> None:
        swap = {"model": self.name, "from_version": from_version, "to_version": to_version, "reason": reason,
                "position": self.position, "ts": time.time()}
        self.produce(self.topics.model_swaps, self.codec.encode("ModelSwap", swap), self.name)
        self.producer.flush(10)
        metrics.MODEL_SWAPS.labels(self.name, reason).inc()

    def publish_update(self) -> None:
        slot = self.champion
        slot.revision = self.registry.update(slot.version, slot.model, examples_seen=slot.examples,
                                             metrics=slot.stats.as_dict(), offsets=self.offsets_json())
        update = {"model": self.name, "version": slot.version, "examples_seen": slot.examples,
                  "revision": slot.revision, "ts": time.time()}
        self.produce(self.topics.model_updates, self.codec.encode("ModelUpdate", update), self.name)
        metrics.MODEL_UPDATES.labels(self.name).inc()
        self.since_update = 0
        self.last_update = time.monotonic()

    def offsets_json(self) -> dict[str, int]:
        return {f"{self.topics.base(t)}/{p}": o for (t, p), o in sorted(self.offsets.items())}

    # -- checkpoint and restore ----------------------------------------------------------------
    def checkpoint(self, force: bool = False) -> bool:
        if self.replay or self.champion is None:
            return False  # mid-recovery: offsets are ahead of what has been applied
        if not (force or self.dirty or self.checkpoint_now):
            return False
        if self.producer.flush(30) > 0:
            log.error("learner %s: producer did not flush; checkpoint postponed", self.name)
            return False
        state = {
            "spec": self.spec, "champion": self.champion, "challenger": self.challenger, "contest": self.contest,
            "offsets": dict(self.offsets), "outcomes_offset": high_watermark(self.settings, self.consumer,
                                                                              self.topics.outcomes),
            "waiting": self.waiting, "position": self.position, "clock": self.clock,
            "held_features": self.held_features, "held_control": self.held_control, "label_clock": self.label_clock,
            "label_ts_by_partition": self.label_ts_by_partition,
        }
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
        if state is None:
            self.first_start()
            return
        self.champion, self.challenger, self.contest = state["champion"], state["challenger"], state["contest"]
        self.offsets, self.waiting = state["offsets"], state["waiting"]
        self.position = self.base_position = state["position"]
        self.clock = state["clock"]
        self.held_features, self.held_control = state["held_features"], state["held_control"]
        self.label_clock = state["label_clock"]
        self.label_ts_by_partition = state.get("label_ts_by_partition", {})
        self.trim_example_buffer()
        published = outcomes_since(self.settings, self.topics.outcomes, state["outcomes_offset"], self.name)
        self.suppress = {(o["event_id"], o["role"]) for o in published}
        self.replay = deque(o["event_id"] for o in published if o["role"] == "champion")
        self.replay_deadline = time.monotonic() + self.cfg.label_grace_s + 30
        log.info("learner %s: restored checkpoint at position %d (champion v%d, challenger %s); %d outcomes "
                 "published since will be re-learned without publishing them again", self.name, self.position,
                 self.champion.version, f"v{self.challenger.version}" if self.challenger else "none",
                 len(self.replay))
        metrics.MODEL_VERSION.labels(self.name, "champion").set(self.champion.version)
        metrics.MODEL_VERSION.labels(self.name, "challenger").set(self.challenger.version if self.challenger else 0)

    def first_start(self) -> None:
        version = self.registry.champion()
        if version is not None:  # a registry without a checkpoint: continue from its champion
            model, meta = self.registry.load(version)
            self.champion = Slot("champion", version, model, Prequential(self.cfg.window),
                                 examples=int(meta.get("examples_seen", 0)))
        else:
            model = parse_model(self.spec)
            version = self.registry.register(model, spec=self.spec, reason="initial")
            self.registry.set_role("champion", version)
            self.champion = Slot("champion", version, model, Prequential(self.cfg.window))
            self.publish_swap(None, version, "initial")
        self.r.delete(self.keys.example_buffer(self.name))
        log.info("learner %s: first start, champion v%d = %s", self.name, version, describe(model))
        self.checkpoint_now = True

    def trim_example_buffer(self) -> None:
        """Drop buffered examples learned after the checkpoint: they are about to be learned again."""
        key = self.keys.example_buffer(self.name)
        while True:
            head = self.r.lindex(key, 0)
            if head is None or json.loads(head)["p"] < self.position:
                return
            self.r.lpop(key)

    # -- metrics and introspection -------------------------------------------------------------
    def export_stats(self) -> None:
        for slot in (self.champion, self.challenger):
            if slot is None:
                continue
            labels = (self.name, str(slot.version), slot.role)
            metrics.ACCURACY.labels(*labels).set(slot.stats.accuracy)
            metrics.WINDOW_ACCURACY.labels(*labels).set(slot.stats.window_accuracy)
            metrics.LOG_LOSS.labels(*labels).set(slot.stats.log_loss)
        metrics.MODEL_VERSION.labels(self.name, "champion").set(self.champion.version if self.champion else 0)
        metrics.MODEL_VERSION.labels(self.name, "challenger").set(self.challenger.version if self.challenger else 0)

    def retire_gauges(self, slot: Slot) -> None:
        for gauge in (metrics.ACCURACY, metrics.WINDOW_ACCURACY, metrics.LOG_LOSS):
            try:
                gauge.remove(self.name, str(slot.version), slot.role)
            except KeyError:
                pass

    def health(self) -> dict[str, Any]:
        body = super().health()
        body.update(self.status())
        return body

    def status(self) -> dict[str, Any]:
        def slot(s: Slot | None):
            return None if s is None else {"version": s.version, "examples": s.examples, **s.stats.as_dict()}

        return {"state": self.state, "model": self.name, "position": self.position,
                "waiting_labels": len(self.waiting), "champion": slot(self.champion),
                "challenger": slot(self.challenger),
                "contest": self.contest.evidence() if self.contest else None}


# -- admin: rollback and manual promotion (the same routes as the prediction service) -------------
def swap_champion(settings: Settings, registry: ModelRegistry, producer, to_version: int, reason: str,
                  position: int = 0) -> dict[str, Any]:
    """Make `to_version` the champion in the registry and publish `model.swaps`; the active learner
    (and every prediction replica) follows. Raises UnknownVersion / TamperedArtifact."""
    registry.load(to_version)  # refuse a version whose artifact is missing or not ours, before the swap
    from_version = registry.champion()
    registry.set_role("champion", to_version)
    if registry.challenger() == to_version:
        registry.set_role("challenger", None)
    swap = {"model": registry.model, "from_version": from_version, "to_version": to_version, "reason": reason,
            "position": position, "ts": time.time()}
    topics = Topics(settings.namespace)
    kafka.produce(producer, topics.model_swaps, get_codec().encode("ModelSwap", swap), registry.model)
    producer.flush(10)
    metrics.MODEL_SWAPS.labels(registry.model, reason).inc()
    return swap


def rollback_target(registry: ModelRegistry) -> int | None:
    """The version the current champion replaced (or its parent)."""
    champion = registry.champion()
    if champion is None:
        return None
    meta = registry.meta(champion)
    return meta.get("replaced") or meta.get("parent")


def check_admin(settings: Settings, authorization: str | None) -> None:
    if settings.admin_token is None:
        raise HTTPException(403, "admin routes are closed: no DRIFTLINE_ADMIN_TOKEN is configured")
    expected = f"Bearer {settings.admin_token.get_secret_value()}".encode()
    if not authorization or not hmac.compare_digest(authorization.encode(), expected):
        raise HTTPException(401, "missing or wrong 'Authorization: Bearer <admin token>'",
                            headers={"WWW-Authenticate": "Bearer"})


def create_app(settings: Settings, worker: LearnerWorker | None = None):
    worker = worker or LearnerWorker(settings)
    app = service_app(SERVICE, worker=worker, title="driftline learner")
    registry = worker.registry

    @app.get("/v1/models", tags=["models"], summary="Champion, challenger, every version and its lineage")
    def models() -> dict[str, Any]:
        return {"model": worker.name, "champion": registry.champion(), "challenger": registry.challenger(),
                "versions": registry.versions(), "live": worker.status()}

    def do_swap(version: int, reason: str) -> dict[str, Any]:
        try:
            return swap_champion(settings, registry, worker.producer, version, reason, worker.position)
        except UnknownVersion:
            raise HTTPException(404, f"model {worker.name} has no version {version}") from None
        except TamperedArtifact:
            raise HTTPException(409, f"version {version}'s artifact signature does not match; refused") from None

    @app.post("/v1/models/rollback", tags=["models"], summary="Make an earlier version the champion again")
    def rollback(body: dict | None = Body(None), authorization: str | None = Header(None)) -> dict[str, Any]:
        check_admin(settings, authorization)
        version = (body or {}).get("version") or rollback_target(registry)
        if not isinstance(version, int):
            raise HTTPException(409, "nothing to roll back to: name a version in {'version': N}")
        return do_swap(version, "rollback")

    @app.post("/v1/models/{version}/promote", tags=["models"], summary="Make a version the champion")
    def promote(version: int, authorization: str | None = Header(None)) -> dict[str, Any]:
        check_admin(settings, authorization)
        return do_swap(version, "manual")

    return app


def serve(settings: Settings) -> None:
    configure_logging(settings)
    parse_model(settings.learner.model)  # a bad spec stops the service here, with its clear error
    run_app(create_app(settings), settings.ports.learner, settings)
